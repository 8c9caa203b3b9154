"""Cheaper searches: fast-scan, HNSW, OPQ, PCA and refine indexes at k = 1024, FAISS
search parameters, exact re-ranking of more candidates (--knn-candidates), and the
overlapped search path (--knn-overlap); real FAISS and the real fairseq-eval-lm."""

import re
import threading

import faiss
import numpy as np
import pytest
import torch

from conftest import eval_lm, perplexity_line
from fairseq_knnlm.storage.datastore import Datastore
from fairseq_knnlm.index import KeyReader, build_index, evaluate_recall, load_index
from fairseq_knnlm.storage.neighbors import read_neighbors
from fairseq_knnlm.retrieval.overlap import Lookahead, SearchOverlap
from fairseq_knnlm.retrieval.retriever import KNNRetriever
from fairseq_knnlm.index.search_params import SearchParamsError, apply_faiss_params, thread_setter

K = 1024  # what kNN-LM searches with

# name -> (factory, training keys, --knn-faiss-params, recall@1024 bound).  Small
# enough to train in about a second here (OPQ trains its own 8-bit PQ: kept tiny).
# Bounds sit below what the builder measured on the tiny LM's 76k x 64 store at
# nprobe 16 (50 queries): 0.75, 0.57, 0.57, 0.67 and 0.57 (refine with k_factor_rf 1,
# i.e. the base's ranking; 0.80 with k_factor_rf=2).
STRUCTURES = {
    "fast-scan": ("IVF64,PQ32x4fs", 5000, None, 0.6),
    "hnsw-quantizer": ("IVF64_HNSW32,PQ16x4fs", 5000, "quantizer_efSearch=48", 0.45),
    "opq": ("OPQ4_16,IVF16,PQ8x4fs", 1000, None, 0.45),
    "pca": ("PCAR32,IVF64,PQ16x4fs", 5000, None, 0.5),
    "refine": ("IVF64,PQ16x4fs,RFlat", 5000, "k_factor_rf=2", 0.45),
}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def build(dstore, output, factory, train_size, **kwargs):
    return build_index(str(dstore), output=str(output), factory=factory, train_size=train_size,
                       progress=False, log=lambda msg: None, **kwargs)


def stored_queries(ds, every=997, seed=0):
    """Stored keys, slightly moved: queries like eval-lm's, without exact ties."""
    keys = np.asarray(ds.keys[::every], dtype=np.float32)
    return keys + 0.01 * np.random.default_rng(seed).standard_normal(keys.shape).astype(np.float32)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_index_structures_build_save_load_and_search_at_k1024(tiny_datastore, tmp_path, name):
    factory, train_size, params, bound = STRUCTURES[name]
    ds = Datastore(str(tiny_datastore))
    meta = build(tiny_datastore, tmp_path / "knn.index", factory, train_size, eval_recall=50, nprobe=16)
    assert meta["factory"] == factory and meta["ntotal"] == ds.size
    assert meta["recall"]["recall@1024"] >= bound, meta["recall"]  # the builder measures k = 1024

    index, index_meta = load_index(str(tmp_path / "knn.index"), ds, nprobe=7, faiss_params=params)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == 7  # --probe reaches the IVF inside pre-transforms and refine wrappers
    if name == "hnsw-quantizer":
        assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 48
    if name == "refine":
        assert faiss.downcast_index(index).k_factor == 2
        # Refining twice the candidates exactly finds more of the true 1024 nearest.
        ivf.nprobe = 16  # as the builder measured
        refined = evaluate_recall(index, KeyReader(ds.keys), 50, "l2")["recall@1024"]
        assert refined >= meta["recall"]["recall@1024"] + 0.1, (refined, meta["recall"])
    ids = index.search(stored_queries(ds), K)[1]
    assert (ids >= 0).all() and (ids < ds.size).all()  # k = 1024 slots filled with store positions
    assert all(len(set(row)) == K for row in ids)  # no repeats from fast-scan's large-k result heap

    # Re-ranked exactly from the stored keys: ascending exact distances.
    dists, vals = KNNRetriever(ds, index, index_meta, K, "l2", candidates=2 * K).search(
        torch.from_numpy(stored_queries(ds)))[:2]
    assert dists.shape == (len(ids), K) and bool((dists[:, 1:] >= dists[:, :-1]).all())


def test_faiss_params_are_checked_in_one_line():
    index = faiss.index_factory(16, "IVF4,PQ4x4fs")
    with pytest.raises(SearchParamsError, match=r"cannot set 'k_factor_rf' .* tunable parameters: nprobe\)$"):
        apply_faiss_params(index, "k_factor_rf=4")
    with pytest.raises(SearchParamsError, match="give nprobe with --probe"):
        apply_faiss_params(index, "nprobe=4")
    with pytest.raises(SearchParamsError, match="cannot read 'max_codes'"):
        apply_faiss_params(index, "max_codes")
    apply_faiss_params(index, " max_codes=100 ")
    assert faiss.extract_index_ivf(index).max_codes == 100


@pytest.fixture(scope="module")
def fast_scan_index(tiny_datastore):
    path = tiny_datastore / "fast-search-ivf64-pq16x4fs.index"
    build(tiny_datastore, path, "IVF64,PQ16x4fs", 5000)
    return path


def test_candidates_keep_the_exact_nearest(tiny_datastore, fast_scan_index):
    ds = Datastore(str(tiny_datastore))
    index, meta = load_index(str(fast_scan_index), ds, nprobe=8)
    q = torch.from_numpy(stored_queries(ds, every=331))
    k, n = 32, 256
    plain = KNNRetriever(ds, index, meta, k, "l2").search(q)
    same = KNNRetriever(ds, index, meta, k, "l2", candidates=k).search(q)
    for a, b in zip(plain[:2], same[:2]):  # N = k is today's path, bit for bit
        assert torch.equal(a, b)
    np.testing.assert_array_equal(plain.ids, same.ids)

    dists, vals = KNNRetriever(ds, index, meta, k, "l2", candidates=n).search(q)[:2]
    # Independently: numpy's exact distances to FAISS's n candidates, in float64.
    ids = index.search(q.numpy(), n)[1]
    keys = np.asarray(ds.keys, dtype=np.float64)
    exact = ((keys[ids] - q.numpy()[:, None, :].astype(np.float64)) ** 2).sum(-1)
    exact_sorted = np.sort(exact, axis=1)
    np.testing.assert_allclose(dists.numpy(), exact_sorted[:, :k], rtol=1e-4, atol=1e-3)
    assert bool((dists[:, 1:] >= dists[:, :-1]).all())
    # The k kept are the nearest of the n: none left out is nearer than the k-th kept.
    assert (exact_sorted[:, k:] >= dists.numpy()[:, -1:] - 1e-3).all()
    # ... so never farther than the first k candidates, which the plain search keeps.
    assert bool((dists <= plain[0].sort(dim=1).values + 1e-3).all())
    # Values are the kept entries' values, in the same order.
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    want_vals = ds.vals[np.take_along_axis(ids, order, 1)]
    assert np.mean(vals.numpy() == want_vals) > 0.99  # float32 vs float64 may swap near-ties


def test_search_overlap_equals_sequential_in_process(tiny_datastore, fast_scan_index):
    """The pipeline alone: batch i searched in the worker while batch i+1 is prepared."""
    ds = Datastore(str(tiny_datastore))
    index, _ = load_index(str(fast_scan_index), ds, nprobe=8)
    batches = [stored_queries(ds, every=500, seed=s) for s in range(5)]
    batches.insert(2, None)  # a batch the caller skips (eval-lm: no net_input)
    faiss.omp_set_num_threads(1)
    seen = {}

    def search(x):
        seen.setdefault("threads", set()).add((threading.current_thread().name, faiss.omp_get_max_threads()))
        return index.search(x, 64)

    prepared = []

    def prepare(batch):
        prepared.append(id(batch))
        return batch * 1.0  # a new array, like a forward pass

    lookahead = Lookahead(batches)
    overlap = SearchOverlap(lookahead.peek, key=id, thread_init=thread_setter())
    results = [overlap.run(b, prepare, search, ready=lambda b: b is not None)[1]
               for b in lookahead if b is not None]
    overlap.close()
    for (d, i), batch in zip(results, [b for b in batches if b is not None]):
        d0, i0 = index.search(batch, 64)
        assert np.array_equal(i, i0) and np.array_equal(d, d0)
    assert len(prepared) == 5  # each batch prepared once: 3 of them while the one before was searched
    assert overlap.prepared_ahead == 3
    # One worker, with the caller's FAISS thread count (OpenMP settings are per thread).
    assert {threads for _, threads in seen["threads"]} == {1}
    assert all(name.startswith("knn-search") for name, _ in seen["threads"])

    def failing_prepare(batch):
        raise ValueError("forward failed")

    overlap = SearchOverlap(lambda: batches[1], key=id)
    with pytest.raises(ValueError, match="forward failed"):
        overlap.run(batches[0], lambda b: b, lambda b: failing_prepare(b))  # search fails in the worker
    overlap.close()


# ------------------------------------------------------ fairseq-eval-lm, end to end

KNN = ["--k", 64, "--lmbda", 0.25, "--knn-temp", 5, "--probe", 8, "--knn-sim-func", "l2",
       "--max-tokens", 1024]  # several batches for the overlap


def knnlm(data_bin, tiny_lm, dstore, index, *flags, check=True):
    return eval_lm(data_bin, tiny_lm, "--knnlm", "--dstore", dstore, "--knn-index", index, *KNN, *flags,
                   check=check)


def same_neighbours(a, b):
    a, b = read_neighbors(str(a)), read_neighbors(str(b))
    assert a.n == b.n > 0
    for name in ("targets", "lm_log_probs", "dists", "vals", "segments"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name


def test_candidates_equal_to_k_is_todays_l2_path(data_bin, tiny_lm, tiny_datastore, fast_scan_index):
    today = knnlm(data_bin, tiny_lm, tiny_datastore, fast_scan_index)
    same = knnlm(data_bin, tiny_lm, tiny_datastore, fast_scan_index, "--knn-candidates", 64)
    assert perplexity_line(same.stdout) == perplexity_line(today.stdout)


def test_overlap_equals_sequential(data_bin, tiny_lm, tiny_datastore, fast_scan_index, tmp_path):
    """Re-ranked candidates, thread flags and saved neighbours, sequential vs overlapped."""
    flags = ["--knn-candidates", 256, "--knn-faiss-threads", 1, "--knn-torch-threads", 1]
    seq = knnlm(data_bin, tiny_lm, tiny_datastore, fast_scan_index, *flags,
                "--knn-save-neighbors", tmp_path / "seq.nbrs")
    ovl = knnlm(data_bin, tiny_lm, tiny_datastore, fast_scan_index, *flags, "--knn-overlap",
                "--knn-save-neighbors", tmp_path / "overlap.nbrs")
    assert perplexity_line(ovl.stdout) == perplexity_line(seq.stdout)
    same_neighbours(tmp_path / "seq.nbrs", tmp_path / "overlap.nbrs")
    ahead = re.search(r"--knn-overlap: (\d+) batches computed while the previous batch was searched", ovl.stdout)
    assert ahead and int(ahead.group(1)) >= 3, ovl.stdout[-2000:]  # it did overlap


def test_bad_search_flags_are_one_line_errors(data_bin, tiny_lm, tiny_datastore, fast_scan_index):
    proc = knnlm(data_bin, tiny_lm, tiny_datastore, fast_scan_index, "--knn-sim-func", "faiss",
                 "--knn-candidates", 128, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(
        "fairseq-knnlm: error: --knn-candidates 128 re-ranks by exact distances: add --knn-sim-func l2")
