"""--knn-pointers (RetoMaton): pointer logic, FAISS distances, and fairseq-eval-lm runs.

The pure logic is checked on hand-made arrays; the batched scorer against a
token-by-token reference over the real tiny datastore and FAISS; and the
stock fairseq-eval-lm for exactness: a threshold above k is the plain kNN-LM
to the last digit, and the saved neighbours of a pointer run reproduce its
perplexity in fairseq-knnlm-sweep.
"""

import json
import logging
import re
import types

import faiss
import numpy as np
import pytest
import torch

from conftest import eval_lm, eval_lm_in_process
from fairseq_knnlm.storage.datastore import Datastore, DatastoreWriter
from fairseq_knnlm.index import make_index
from fairseq_knnlm.storage.neighbors import read_neighbors
from fairseq_knnlm.retrieval.pointers import (
    PointerError,
    build_pointers,
    check_datastore,
    follow,
    index_distances,
    last_entries,
    rank_candidates,
)
from fairseq_knnlm.retrieval.retriever import KNNRetriever

K, TEMP, LMBDA = 16, 5.0, 0.25
REPORT = re.compile(r"kNN pointers: searched ([0-9,]+) of ([0-9,]+) tokens; ([0-9.]+)% of searches saved")


# ------------------------------------------------------------- pure logic
def test_last_entries_are_the_ends_of_non_empty_shards():
    assert last_entries([5]).tolist() == [4]
    assert last_entries([3, 0, 4, 2]).tolist() == [2, 6, 8]


def test_follow_takes_successors_of_entries_with_the_observed_value():
    ends = last_entries([6, 4])  # entries 5 and 9 end a shard / the store
    ids = np.array([
        [3, 0, 7, -1],   # values 1, 1, 2: the observed 1 keeps 3 and 0, in that order
        [5, 2, 9, 8],    # 5 ends shard 0 and 9 the store: only 2 and 8 lead on
        [4, 4, 1, 6],    # a repeated entry gives one candidate
        [1, 2, 3, 4],    # nothing has the observed value
    ])
    vals = np.array([[1, 1, 2, -1], [7, 7, 7, 7], [3, 3, 3, 9], [0, 0, 0, 0]])
    observed = np.array([1, 7, 3, 5])
    got = follow(ids, vals, observed, ends, k=4)
    assert got.tolist() == [[4, 1, -1, -1], [3, 9, -1, -1], [5, 2, -1, -1], [-1, -1, -1, -1]]
    assert got.dtype == np.int64
    # At most k candidates, the first ones in rank order; a narrower input is padded to k.
    assert follow(np.array([[0, 1, 2]]), np.array([[1, 1, 1]]), np.array([1]), ends, k=2).tolist() == [[1, 2]]
    assert follow(np.array([[0]]), np.array([[1]]), np.array([1]), ends, k=3).tolist() == [[1, -1, -1]]


def test_rank_candidates_sorts_by_distance_then_candidate_order():
    d = np.array([[3.0, 1.0, np.inf, 1.0]], dtype=np.float32)
    ids, vals = np.array([[10, 11, -1, 12]]), np.array([[5, 6, -1, 7]])
    rd, ri, rv = rank_candidates(d, ids, vals)
    assert ri.tolist() == [[11, 12, 10, -1]] and rv.tolist() == [[6, 7, 5, -1]]
    assert rd.tolist() == [[1.0, 1.0, 3.0, np.inf]]


def test_a_pruned_datastore_is_refused(tmp_path):
    writer = DatastoreWriter(tmp_path / "pruned", 4, np.float32)
    writer.append(np.zeros((3, 4), np.float32), np.array([1, 2, 3], np.int32))
    writer.commit({"keytype": "last_ffn_input", "pruned": {"from": "abc", "size_before": 5, "k": 8}})
    with pytest.raises(PointerError, match="is pruned") as e:
        check_datastore(Datastore(tmp_path / "pruned"))
    assert "\n" not in str(e.value)


# ------------------------------------------- batched scorer vs a reference
def reference_pointers(index, keys, store_vals, size, queries, targets, lengths, k, min_candidates):
    """RetoMaton token by token in plain Python: (neighbours used per token, searches)."""
    used_all, searched, pos = [], 0, 0
    for length in lengths:
        candidates = []
        for _ in range(length):
            q = queries[pos]
            if len(candidates) >= min_candidates:
                d = [float(((q - keys[c]) ** 2).sum()) for c in candidates]
                used = sorted(zip(d, candidates, range(len(d))))
                used = [(c, dist) for dist, c, _ in used]
            else:
                dists, ids = index.search(q[None], k)
                used = [(int(i), float(((q - keys[i]) ** 2).sum())) for i in ids[0] if i >= 0]
                searched += 1
            used_all.append(used)
            candidates = []
            for i, _ in used:
                if store_vals[i] == targets[pos] and i + 1 < size and i + 1 not in candidates:
                    candidates.append(i + 1)
            pos += 1
    return used_all, searched


@pytest.fixture(scope="module")
def store(tiny_datastore):
    ds = Datastore(tiny_datastore)
    keys = np.ascontiguousarray(ds.keys[:], dtype=np.float32)
    return ds, keys


def memorised_rows(ds, keys, starts, length, seed=0):
    """Rows of consecutive stored contexts (slightly perturbed): pointers chain through them."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(s, min(s + length, ds.size)) for s in starts])
    lengths = [min(length, ds.size - s) for s in starts]
    q = keys[idx] + rng.normal(0, 0.01, size=(len(idx), keys.shape[1])).astype(np.float32)
    return torch.from_numpy(q), torch.from_numpy(ds.vals[idx].astype(np.int64)), lengths


@pytest.mark.parametrize("min_candidates", [1, 3])
def test_batched_pointers_equal_the_token_by_token_reference(store, min_candidates):
    ds, keys = store
    # An exhaustive scan that computes each (query, entry) distance on its own, so
    # searching a few rows together gives each what searching it alone gives.
    index = faiss.index_factory(ds.dim, "IVF1,Flat")
    index.train(keys[:100])
    index.add(keys)
    retriever = KNNRetriever(ds, index, {"metric": "l2"}, K, "l2")
    args = types.SimpleNamespace(k=K, knn_pointer_min_candidates=min_candidates)
    pointers = build_pointers(args, ds, retriever)
    # The last row runs into the end of the store.
    starts = [100, 2000, 9000, 20000, 40000, ds.size - 30]
    queries, targets, lengths = memorised_rows(ds, keys, starts, 40)
    dists, vals = pointers.score_rows(queries, targets, torch.tensor(lengths))[:2]
    expected, searched = reference_pointers(index, keys, ds.vals, ds.size, queries.numpy(),
                                            targets.numpy(), lengths, K, min_candidates)
    assert pointers.searched == searched and pointers.tokens == len(targets)
    assert searched < len(targets) - 20  # memorised text: many tokens follow pointers
    for row, used in enumerate(expected):
        n = len(used)
        assert sorted(vals[row, :n].tolist()) == sorted(int(ds.vals[i]) for i, _ in used)
        assert (vals[row, n:] == -1).all() and torch.isinf(dists[row, n:]).all()
        np.testing.assert_allclose(dists[row, :n].numpy(), sorted(d for _, d in used), rtol=1e-4, atol=1e-4)
        assert (dists[row, :n].diff() >= 0).all()  # sorted like search results


def test_threshold_above_k_is_one_plain_search(store):
    ds, keys = store
    index = faiss.IndexFlatL2(ds.dim)
    index.add(keys)
    retriever = KNNRetriever(ds, index, {"metric": "l2"}, K, "faiss")
    pointers = build_pointers(types.SimpleNamespace(k=K, knn_pointer_min_candidates=K + 1), ds, retriever)
    queries, targets, lengths = memorised_rows(ds, keys, range(0, 3000, 100), 60)
    dists, vals = pointers.score_rows(queries, targets, torch.tensor(lengths))[:2]
    plain_d, plain_v = retriever.search(queries)[:2]
    assert torch.equal(dists, plain_d) and torch.equal(vals, plain_v)
    assert pointers.searched == pointers.tokens == len(targets)


@pytest.mark.parametrize("factory", ["IVF32,PQ8", "PCAR32,IVF32,PQ8", "IVF32,PQ8x4fs,RFlat"])
def test_index_distances_are_the_search_distances(store, factory):
    """--knn-sim-func faiss scores candidates with the index's own distances."""
    ds, keys = store
    index = make_index(ds.dim, factory, "l2")  # the builder's: no polysemous training
    index.train(keys[::32])
    index.add(keys)
    faiss.extract_index_ivf(index).nprobe = 32
    distances = index_distances(index, "l2")
    q = keys[5000:5064] + np.float32(0.01)
    scores, ids = index.search(q, K)
    tol = 0.02 if "x4fs" in factory and "RFlat" not in factory else 1e-4  # fast-scan rounds its tables
    np.testing.assert_allclose(distances(q, ids), scores, rtol=tol, atol=tol * scores.max())
    retriever = KNNRetriever(ds, index, {"metric": "l2"}, K, "faiss")
    build_pointers(types.SimpleNamespace(k=K, knn_pointer_min_candidates=2), ds, retriever)


def test_an_index_that_cannot_give_entry_distances_is_refused(store):
    ds, keys = store
    index = faiss.IndexIDMap(faiss.IndexFlatL2(ds.dim))  # cannot reconstruct
    index.add_with_ids(keys, np.arange(ds.size))
    retriever = KNNRetriever(ds, index, {"metric": "l2"}, K, "faiss")
    with pytest.raises(PointerError, match="--knn-sim-func l2") as e:
        build_pointers(types.SimpleNamespace(k=K, knn_pointer_min_candidates=2), ds, retriever)
    assert "\n" not in str(e.value)


def test_a_fast_scan_index_with_faiss_distances_is_refused(store):
    """FAISS cannot reconstruct a fast-scan IVF's entries (it crashes once the index is read)."""
    ds, keys = store
    index = make_index(ds.dim, "IVF32,PQ8x4fs", "l2")
    index.train(keys[::32])
    index.add(keys)
    retriever = KNNRetriever(ds, index, {"metric": "l2"}, K, "faiss")
    with pytest.raises(PointerError, match="fast-scan.*--knn-sim-func l2") as e:
        build_pointers(types.SimpleNamespace(k=K, knn_pointer_min_candidates=2), ds, retriever)
    assert "\n" not in str(e.value)


# ------------------------------------------------------ fairseq-eval-lm runs

def pointer_report(caplog):
    found = [REPORT.search(r.getMessage()) for r in caplog.records]
    found = [m for m in found if m]
    assert len(found) == 1, [r.getMessage() for r in caplog.records][-20:]
    searched, tokens, saved = found[0].groups()
    return int(searched.replace(",", "")), int(tokens.replace(",", "")), float(saved)


def test_threshold_above_k_equals_the_plain_knnlm_in_eval_lm(data_bin, tiny_lm, tiny_datastore, flat_index, caplog):
    knn = ["--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index,
           "--k", K, "--knn-temp", TEMP, "--lmbda", LMBDA]
    plain = eval_lm_in_process(data_bin, tiny_lm, *knn)
    with caplog.at_level(logging.INFO):
        never = eval_lm_in_process(data_bin, tiny_lm, *knn, "--knn-pointers", "--knn-pointer-min-candidates", K + 1)
    assert never == plain  # loss and perplexity, every digit
    searched, tokens, saved = pointer_report(caplog)
    assert searched == tokens > 1000 and saved == 0


def test_pointer_run_saves_searches_and_its_neighbours_reproduce_it(
    tmp_path, data_bin, tiny_lm, tiny_datastore, flat_index, caplog, capsys
):
    """--knn-sim-func faiss end to end (the l2 path is checked against the reference above)."""
    from fairseq_knnlm.cli import sweep as sweep_cli

    nbdir = tmp_path / "valid.nbrs"
    with caplog.at_level(logging.INFO):
        loss, ppl = eval_lm_in_process(
            data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index,
            "--k", K, "--knn-temp", TEMP, "--lmbda", LMBDA,
            "--knn-pointers", "--knn-pointer-min-candidates", 2, "--knn-save-neighbors", nbdir)
    searched, tokens, saved = pointer_report(caplog)
    assert 0 < searched < tokens and saved > 0
    assert ppl == pytest.approx(2 ** loss, rel=1e-6)  # fairseq's perplexity (float32) of its base-2 loss
    nb = read_neighbors(nbdir)
    assert nb.meta["pointer_min_candidates"] == 2 and nb.n == tokens
    vals = np.asarray(nb.vals)
    pointer_rows = (vals < 0).any(axis=1)  # fewer than k candidates: scored by pointers
    assert pointer_rows.any()
    # The sweep at the run's own (k, T, λ) gives the run's perplexity: what was saved is what was used.
    code = sweep_cli.main([str(nbdir), "--k", str(K), "--knn-temp", str(TEMP), "--lmbda", str(LMBDA),
                           "--json", str(tmp_path / "r.json"), "--no-plots", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.load(open(tmp_path / "r.json"))
    assert np.array(report["perplexity"]).item() == pytest.approx(ppl, rel=1e-6)
    assert np.array(report["loss"]).item() == pytest.approx(loss, rel=1e-6)


def test_bad_pointer_flags_are_refused_in_one_line(data_bin, tiny_lm, tiny_datastore, flat_index):
    proc = eval_lm(data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index,
                   "--knn-pointers", "--knn-pointer-min-candidates", 0, check=False)
    assert proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-1]
    assert "error: --knn-pointer-min-candidates must be at least 1" in last, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout


def test_generation_refuses_pointers(data_bin, tiny_lm, tiny_datastore, flat_index):
    from fairseq_knnlm.integration.generation import GenerationError
    from fairseq_knnlm.integration.hub import from_pretrained

    lm = from_pretrained(str(tiny_lm.parent), tiny_lm.name, str(data_bin), dstore=str(tiny_datastore),
                         knn_index=str(flat_index), k=K, knn_pointers=True, knn_pointer_min_candidates=2)
    with pytest.raises(GenerationError, match="generate without --knn-pointers") as e:
        lm.sample("The game was", beam=1, max_len_b=5)
    assert "\n" not in str(e.value)
