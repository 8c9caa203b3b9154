"""--knn-distributed-index: index pieces spread over gloo ranks, results equal to one process (real FAISS, real
torch.distributed, real fairseq-eval-lm under torchrun)."""

import os
import socket
from datetime import timedelta
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from conftest import USER_DIR, eval_lm, perplexity_line, run
from fairseq_knnlm.storage.datastore import Datastore, DatastoreWriter
from fairseq_knnlm.retrieval.distributed import (
    DistributedSearchError, check_process_group, merge_candidates, merge_order, open_distributed_retriever,
    pieces_of_rank, record_dtype, rerank_order,
)
from fairseq_knnlm.index import build_index, load_index
from fairseq_knnlm.storage.neighbors import read_neighbors
from fairseq_knnlm.retrieval.retriever import KNNRetriever
from fairseq_knnlm.index import open_index
from fairseq_knnlm.index.shards import add_shard, train_only
from test_index import META, clustered_keys, value_of

N, DIM = 6000, 32
SETTINGS = dict(factory="IVF32,PQ8", train_size=4000, seed=3)
QUIET = dict(progress=False, log=lambda msg: None)
# Rank 0 has an empty round while rank 1 searches, both are empty in round 3, and rank 1 runs out of
# batches first (its first round is empty too).  Round 4's thousands of queries: FAISS's scores of a
# query depend on the batch it is searched in, so each rank's block must be searched on its own.
ROUNDS = {0: [7, 0, 13, 0, 3000, 5], 1: [0, 11, 14, 0, 2000]}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ---------------------------------------------------------------- (a) the merge, pure


def reference_merge(scores, ids, metric, k):
    """Each row's k best by FAISS's order, written out: (score, id) ascending for l2,
    descending for ip; unfilled (-1) last in their given order."""
    out = []
    for s_row, i_row in zip(scores, ids):
        filled = [(s, i, c) for c, (s, i) in enumerate(zip(s_row, i_row)) if i >= 0]
        filled.sort(key=lambda t: (t[0], t[1]) if metric == "l2" else (-t[0], -t[1]))
        unfilled = [c for c, i in enumerate(i_row) if i < 0]
        out.append(([c for _, _, c in filled] + unfilled)[:k])
    return np.array(out, dtype=np.int64).reshape(len(scores), k)


def sorted_shard_results(rng, nshard, n, k, metric, contiguous):
    """Per-shard sorted (score, id) lists as FAISS returns them, with many ties
    (scores on a coarse grid) and unfilled tails; ``contiguous``: shard s's ids
    are all below shard s+1's (the pieces of one rank in order)."""
    D = np.empty((nshard, n, k), np.float32)
    I = np.empty((nshard, n, k), np.int64)
    for s in range(nshard):
        for q in range(n):
            filled = rng.integers(0, k + 1)
            ids = rng.choice(1000, k, replace=False) + (s * 1000 if contiguous else rng.integers(0, 5) * 1000)
            scores = rng.integers(0, 6, k).astype(np.float32) / 2
            order = np.lexsort((ids, scores) if metric == "l2" else (-ids, -scores))
            D[s, q], I[s, q] = scores[order], ids[order]
            I[s, q, filled:] = -1
            D[s, q, filled:] = np.finfo(np.float32).max * (1 if metric == "l2" else -1)
    return D, I


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_merge_order_is_faiss_order_with_ties_by_position(metric):
    rng = np.random.default_rng(0)
    k = 8
    D, I = sorted_shard_results(rng, 3, 40, k, metric, contiguous=False)
    scores, ids = D.transpose(1, 0, 2).reshape(40, -1), I.transpose(1, 0, 2).reshape(40, -1)
    got = merge_order(scores, ids, metric, k)
    assert np.array_equal(got, reference_merge(scores, ids, metric, k))
    ties = [(np.diff(np.take_along_axis(scores, got, 1)[q][np.take_along_axis(ids, got, 1)[q] >= 0]) == 0).any()
            for q in range(40)]
    assert sum(ties) > 10 and (np.take_along_axis(ids, got, 1) < 0).any()  # ties and unfilled slots are exercised
    # FAISS's own merge of shard results (what IndexShards does) agrees when the shards are in id order
    D, I = sorted_shard_results(rng, 3, 40, k, metric, contiguous=True)
    fd, fi = faiss.merge_knn_results(D, I, keep_max=metric == "ip")
    scores, ids = D.transpose(1, 0, 2).reshape(40, -1), I.transpose(1, 0, 2).reshape(40, -1)
    got = merge_order(scores, ids, metric, k)
    assert np.array_equal(np.take_along_axis(ids, got, 1), fi)
    filled = fi >= 0
    assert np.array_equal(np.take_along_axis(scores, got, 1)[filled], fd[filled])


def test_merge_candidates_reranks_like_the_retriever():
    rng = np.random.default_rng(1)
    n, width, k = 30, 12, 5
    parts = np.zeros((n, 2 * width), dtype=record_dtype(exact=True, counts=True))
    parts["id"] = rng.permutation(10_000)[: n * 2 * width].reshape(n, -1)
    parts["id"][rng.random(parts.shape) < 0.2] = -1
    parts["score"] = rng.integers(0, 8, parts.shape) / 4
    parts["exact"] = rng.integers(0, 8, parts.shape) / 4  # exact ties keep FAISS's order
    parts["val"], parts["count"] = parts["id"] % 97, parts["id"] % 5 + 1
    top = merge_candidates(parts, "l2", width, k)
    # the reference: FAISS's `width` best, then KNNRetriever._index_search's stable re-ranking
    best = np.take_along_axis(parts, reference_merge(parts["score"], parts["id"], "l2", width), 1)
    exact = np.where(best["id"] < 0, np.inf, best["exact"])
    expected = np.take_along_axis(best, np.argsort(exact, axis=1, kind="stable")[:, :k], 1)
    assert np.array_equal(top, expected)
    assert np.array_equal(rerank_order(best["exact"], best["id"], k), np.argsort(exact, 1, kind="stable")[:, :k])
    # without re-ranking (candidates == k), the merge alone
    assert np.array_equal(merge_candidates(parts, "l2", k, k), best[:, :k])
    assert pieces_of_rank(5, 1, 2) == [1, 3] and pieces_of_rank(5, 0, 2) == [0, 2, 4]


def test_start_up_refusal_without_a_process_group():
    with pytest.raises(DistributedSearchError, match="needs fairseq's distributed launch"):
        check_process_group()


# ---------------------------------------------------------------- (b) 2 gloo ranks


def write_store(path, keys, counts=None):
    w = DatastoreWriter(str(path), keys.shape[1], np.float32, with_counts=counts is not None)
    w.append(keys, value_of(np.arange(len(keys))), counts)
    w.commit(META)
    return str(path)


def build_pieces(store, index_dir, num_shards, metric="l2"):
    os.makedirs(index_dir)
    trained = os.path.join(index_dir, "trained.index")
    train_only(store, trained, metric=metric, **SETTINGS, **QUIET)
    for s in range(num_shards):
        add_shard(store, trained, s, num_shards, **QUIET)
    return str(index_dir)


def whole_index(store, path):
    build_index(store, output=str(path), **SETTINGS, **QUIET)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store whose second half (index piece 1) copies its first (piece 0), and some keys twice more,
    so that FAISS scores tie inside and across pieces at every rank of the results; and the same keys
    with counts (a pruned store)."""
    root = tmp_path_factory.mktemp("dist")
    half = clustered_keys(N // 2, DIM, seed=7)
    half[1:400:10] = half[0:400:10]
    keys = np.concatenate([half, half])
    plain = write_store(root / "plain", keys)
    pruned = write_store(root / "pruned", keys, counts=(np.arange(N) % 3 + 1).astype(np.int32))
    rng = np.random.default_rng(11)
    queries = {}
    for rank, sizes in ROUNDS.items():
        batches = []
        for n in sizes:
            q = keys[rng.integers(0, N, n)] + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
            q[: n // 2] = keys[rng.integers(0, 40, n // 2) * 10]  # copied keys: tied neighbours
            batches.append(q.astype(np.float32))
        queries[rank] = batches
    return dict(
        root=root, plain=plain, pruned=pruned, queries=queries,
        plain_l2=build_pieces(plain, root / "plain-l2", 2), plain_ip=build_pieces(plain, root / "plain-ip", 2, "ip"),
        pruned_l2=build_pieces(pruned, root / "pruned-l2", 2), one_piece=build_pieces(plain, root / "one", 1),
        whole=whole_index(plain, root / "whole.index"),
    )


# name: (store, pieces, k, probe, sim_func, candidates); plain stores return ids, pruned ones counts
CASES = {
    "faiss-unfilled": ("plain", "plain_l2", 512, 1, "faiss", None),  # 1 of 32 lists: fewer than k found
    "l2-tied-boundary": ("plain", "plain_l2", 3, 8, "l2", None),  # tied copies in 2 or 4: cut at the 3rd slot
    "ip-tied-boundary": ("plain", "plain_ip", 3, 8, "faiss", None),  # ties by descending position
    "pruned-l2-candidates": ("pruned", "pruned_l2", 16, 8, "l2", 48),
}


def run_args(k, probe, sim_func, candidates):
    return SimpleNamespace(knn_distributed_index=True, knnlm=True, knn_pointers=False, probe=probe,
                           knn_faiss_params=None, knn_index_mmap=False, knn_gpu=False, k=k,
                           knn_sim_func=sim_func, knn_candidates=candidates)


def search(retriever, q, pruned):
    got = retriever.search(torch.from_numpy(q))
    third = got.counts if pruned else got.ids
    return [x.numpy() if isinstance(x, torch.Tensor) else x for x in (got.dists, got.vals, third)]


def rank_main(rank, world, init_file, stores, out_dir):
    """One gloo rank: the refusals, then every case searched distributed, then the references searched in
    this process, whose FAISS threads (OMP_NUM_THREADS=1, IndexShards' threads too) are the ranks'."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        errors = []
        for path in (stores["one_piece"], os.path.join(stores["plain_l2"], "trained.index")):
            try:
                open_distributed_retriever(run_args(8, 8, "faiss", None), Datastore(stores["plain"]), path)
            except DistributedSearchError as e:
                errors.append(str(e))
        with open(os.path.join(out_dir, f"errors-{rank}.txt"), "w") as f:
            f.write("\n".join(errors))
        batches = stores["queries"][rank]
        for name, (store, pieces, k, probe, sim_func, candidates) in CASES.items():
            ds, pruned = Datastore(stores[store]), store == "pruned"
            retriever = open_distributed_retriever(run_args(k, probe, sim_func, candidates), ds, stores[pieces])
            results = {"got": [search(retriever, q, pruned) for q in batches]}
            retriever.serve_until_done()
            references = {"pieces": open_index(stores[pieces], ds, nprobe=probe)}  # all pieces, one process
            if pieces == "plain_l2":  # the index built whole: the same training, the same results for l2
                references["whole"] = load_index(stores["whole"], ds, nprobe=probe)
            for ref, (index, meta) in references.items():
                reference = KNNRetriever(ds, index, meta, k, sim_func, candidates)
                results[ref] = [search(reference, q, pruned) for q in batches]
            np.savez(os.path.join(out_dir, f"{name}-{rank}.npz"),
                     stats=[retriever.queries_searched, retriever.queries_served, retriever.rounds],
                     **{f"{ref}-{j}-{i}": a for ref, found in results.items()
                        for j, arrays in enumerate(found) for i, a in enumerate(arrays)})
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(stores, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), stores, str(tmp_path)), nprocs=2, join=True)
    errors = (tmp_path / "errors-0.txt").read_text().splitlines()
    assert "holds 1 index pieces for 2 ranks" in errors[0] and "needs --knn-index to be a directory" in errors[1]
    total = sum(map(sum, ROUNDS.values()))
    for name in CASES:
        tied = unfilled = 0
        for rank, sizes in ROUNDS.items():
            found = np.load(tmp_path / f"{name}-{rank}.npz")
            assert found["stats"].tolist() == [sum(sizes), total - sum(sizes), len(ROUNDS[0])], name
            refs = ["pieces", "whole"] if CASES[name][1] == "plain_l2" else ["pieces"]
            for key in (key for key in found.files if key.startswith("got-")):
                for ref in refs:  # dists, vals, and ids or counts, bit for bit
                    assert np.array_equal(found[key], found[key.replace("got", ref)]), (name, rank, key, ref)
                if key.endswith("-0"):
                    d = found[key]
                    tied += int(((d[:, 1:] == d[:, :-1]) & np.isfinite(d[:, 1:])).sum())
                    unfilled += int(np.isinf(d).sum())
        assert tied > 0, name  # tied neighbours were merged
        assert unfilled > 0 or name != "faiss-unfilled"  # unfilled slots crossed the ranks


# ---------------------------------------------------------------- (c) fairseq-eval-lm under torchrun


@pytest.mark.slow
def test_torchrun_eval_lm_equals_each_shard_searched_in_one_process(artefacts, data_bin, tiny_lm, tiny_datastore,
                                                                    monkeypatch):
    from fairseq_knnlm.cli.build_index import main as build_index_cli

    # one FAISS and torch thread in every process and thread (IndexShards searches its pieces in threads
    # of its own, with OpenMP's default count): FAISS's scores depend on its thread count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    idx = artefacts / "dist-pieces"
    idx.mkdir()
    trained = str(idx / "trained.index")
    assert build_index_cli(["--dstore", str(tiny_datastore), "--train-only", "--output", trained,
                            "--index-factory", "IVF32,PQ8", "--train-size", "8000", "--quiet"]) == 0
    for s in range(2):
        assert build_index_cli(["--dstore", str(tiny_datastore), "--trained", trained, "--shard-id", str(s),
                                "--num-shards", "2", "--quiet"]) == 0
    search_flags = ["--knnlm", "--dstore", tiny_datastore, "--knn-index", idx, "--k", 64, "--probe", 4,
                    "--knn-sim-func", "l2"]
    distributed = artefacts / "dist-nbrs"
    cmd = " ".join(map(str, [
        "exec fairseq-eval-lm", data_bin, "--path", tiny_lm, "--gen-subset valid --tokens-per-sample 128",
        "--context-window 64 --cpu --max-tokens 4096 --num-workers 0 --no-progress-bar --user-dir", USER_DIR,
        "--task knnlm_language_modeling", *search_flags, "--knn-distributed-index --knn-overlap",
        "--knn-save-neighbors", distributed, "--distributed-backend gloo --distributed-world-size 2",
        "--distributed-no-spawn --distributed-init-method env:// --distributed-rank $RANK",
    ]))
    with socket.socket() as free:  # a port no other run on this machine holds
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = run(["torchrun", "--nproc_per_node", 2, "--master_port", port,
               "--no-python", "bash", "-c", cmd]).stdout
    assert "rank 0 of 2 holds index pieces [0] of 2" in out
    single = artefacts / "single-nbrs"
    shard0 = eval_lm(data_bin, tiny_lm, *search_flags, "--knn-save-neighbors", single,
                     "--num-shards", 2, "--shard-id", 0).stdout
    eval_lm(data_bin, tiny_lm, *search_flags, "--knn-save-neighbors", single, "--num-shards", 2, "--shard-id", 1)
    # rank 0 prints its shard's perplexity (fairseq silences the other ranks' INFO lines)
    assert perplexity_line(out) == perplexity_line(shard0)
    searches = [line.split("kNN searches: ")[1] for text in (out, shard0) for line in text.splitlines()
                if "kNN searches: " in line]
    assert len(searches) == 2 and searches[0] == searches[1]
    # both ranks' neighbours (what every score is made of) equal the one-process runs' exactly
    a, b = read_neighbors(distributed), read_neighbors(single)
    assert a.n == b.n and a.meta["num_shards"] == 2
    for field in ("targets", "lm_log_probs", "segments"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert np.array_equal(a.dists[:], b.dists[:]) and np.array_equal(a.vals[:], b.vals[:])
