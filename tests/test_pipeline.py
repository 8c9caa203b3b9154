"""The kNN-LM pipeline takes new stages written against its interfaces: a selector that
searches every other token and a brute-force neighbour source, on the tiny LM's real
datastore and a real FAISS index, against an independent numpy reference."""

import faiss
import numpy as np
import pytest
import torch

from fairseq_knnlm.retrieval.base import Batch, NeighbourSource, Neighbours, SearchNeighbours, Selector
from fairseq_knnlm.retrieval.retriever import KNNRetriever
from fairseq_knnlm.scoring.pipeline import KNNPipeline
from fairseq_knnlm.storage.datastore import Datastore

K, LMBDA, TEMP = 8, 0.3, 10.0


class EveryOtherRow(Selector):
    """Searches rows 0, 2, 4, ...; the others keep the LM's log-probability."""

    def select(self, batch):
        return np.arange(len(batch.queries)) % 2 == 0


class BruteForce(NeighbourSource):
    """The k nearest stored keys by exact squared L2, computed with torch over the whole store."""

    def __init__(self, keys, vals, k):
        self.keys, self.vals, self.k = torch.from_numpy(keys), torch.from_numpy(vals), k

    def neighbours(self, batch, selection):
        q = batch.queries if selection is None else batch.queries[selection.rows]
        d = torch.cdist(q.double(), self.keys.double()) ** 2
        dists, ids = d.topk(self.k, dim=1, largest=False)
        return Neighbours(dists.float(), self.vals[ids], None, ids.numpy())


@pytest.fixture(scope="module")
def store(tiny_datastore):
    ds = Datastore(str(tiny_datastore))
    keys = np.array(ds.keys, dtype=np.float32)  # a writable copy: torch shares it
    index = faiss.IndexFlatL2(ds.dim)
    index.add(keys)
    return ds, keys, np.array(ds.vals, dtype=np.int64), index


def batch_of(keys, vals, rows=60):
    """Stored keys slightly moved (no exact ties), their tokens, and unigram LM log-probs."""
    at = np.linspace(0, len(keys) - 1, rows).astype(np.int64)
    queries = keys[at] + 0.01 * np.random.default_rng(0).standard_normal((rows, keys.shape[1])).astype(np.float32)
    unigram = np.bincount(vals, minlength=vals.max() + 1) / len(vals)
    targets = vals[at]
    return Batch(torch.from_numpy(queries), torch.from_numpy(np.log(unigram[targets]).astype(np.float32)),
                 torch.from_numpy(targets), torch.tensor([rows]))


def reference(keys, vals, batch, searched):
    """log(λ p_kNN + (1-λ) p_LM) in float64 for searched rows, the LM's elsewhere."""
    out = batch.lm_lp.double().numpy().copy()
    for row in np.nonzero(searched)[0]:
        d = ((keys.astype(np.float64) - batch.queries[row].double().numpy()) ** 2).sum(1)
        near = np.argsort(d, kind="stable")[:K]
        w = np.exp(-(d[near] - d[near].min()) / TEMP)
        p_knn = w[vals[near] == int(batch.targets[row])].sum() / w.sum()
        out[row] = np.log(LMBDA * p_knn + (1 - LMBDA) * np.exp(out[row]))
    return out


def test_a_selector_plugs_into_the_pipeline(store):
    ds, keys, vals, index = store
    retriever = KNNRetriever(ds, index, {"metric": "l2"}, K, "l2")
    pipeline = KNNPipeline(SearchNeighbours(retriever), LMBDA, TEMP, selector=EveryOtherRow())
    batch = batch_of(keys, vals)
    scores = pipeline.target_log_probs(batch)

    searched = np.arange(len(batch.targets)) % 2 == 0
    np.testing.assert_allclose(scores.double().numpy(), reference(keys, vals, batch, searched), rtol=1e-5, atol=1e-5)
    assert torch.equal(scores[~torch.from_numpy(searched)], batch.lm_lp[~torch.from_numpy(searched)])
    assert retriever.queries_searched == searched.sum() and pipeline.stats.searches == 1
    assert (pipeline.stats.selected, pipeline.stats.decided) == (searched.sum(), len(searched))
    # the memorised rows' own entries raise their tokens' probabilities
    assert (scores[torch.from_numpy(searched)] > batch.lm_lp[torch.from_numpy(searched)]).all()


def test_a_neighbour_source_plugs_into_both_entry_points(store):
    ds, keys, vals, index = store
    batch = batch_of(keys, vals)
    brute = KNNPipeline(BruteForce(keys, vals, K), LMBDA, TEMP)
    faiss_search = KNNPipeline(SearchNeighbours(KNNRetriever(ds, index, {"metric": "l2"}, K, "l2")), LMBDA, TEMP)
    scores = brute.target_log_probs(batch)
    everywhere = np.ones(len(batch.targets), dtype=bool)
    np.testing.assert_allclose(scores.double().numpy(), reference(keys, vals, batch, everywhere), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, faiss_search.target_log_probs(batch), rtol=1e-5, atol=1e-5)

    # generation's entry point: the whole distribution, which at the targets is the same
    vocab = int(vals.max()) + 1
    lm_dist = torch.log_softmax(torch.randn(len(batch.targets), vocab, generator=torch.Generator().manual_seed(0)), -1)
    lm_dist.scatter_(1, batch.targets.unsqueeze(1), batch.lm_lp.unsqueeze(1))  # only the targets' values matter
    full = brute.vocab_log_probs(batch._replace(lm_lp=lm_dist))
    torch.testing.assert_close(full.gather(1, batch.targets.unsqueeze(1)).squeeze(1), scores, rtol=1e-5, atol=1e-5)
