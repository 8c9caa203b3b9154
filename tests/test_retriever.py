"""Exact (l2 / ip) distances recomputed from stored keys, against numpy, for every key layout."""

import faiss
import numpy as np
import pytest
import torch

from fairseq_knnlm.storage.datastore import Datastore, DatastoreWriter, shard_dirname
from fairseq_knnlm.retrieval.retriever import KNNRetriever

DIM, SIZE, K = 16, 600, 32


def write_store(root, keys, vals, dtype, num_shards):
    bounds = np.linspace(0, len(keys), num_shards + 1).astype(int)
    for shard in range(num_shards):
        target = root / shard_dirname(shard, num_shards) if num_shards > 1 else root
        writer = DatastoreWriter(str(target), DIM, dtype)
        lo, hi = bounds[shard], bounds[shard + 1]
        writer.append(keys[lo:hi], vals[lo:hi])
        writer.commit({"keytype": "ffn_input"})
    return Datastore(str(root))


@pytest.mark.parametrize("dtype,num_shards", [(np.float32, 1), (np.float16, 1), (np.float32, 3)])
@pytest.mark.parametrize("sim_func", ["l2", "ip"])
def test_recomputed_distances_match_numpy(tmp_path, dtype, num_shards, sim_func):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((SIZE, DIM)).astype(dtype)
    vals = rng.integers(4, 50, SIZE)
    store = write_store(tmp_path / "dstore", keys, vals, dtype, num_shards)
    index = faiss.IndexFlatL2(DIM) if sim_func == "l2" else faiss.IndexFlatIP(DIM)
    index.add(keys.astype(np.float32))
    retriever = KNNRetriever(store, index, {"metric": sim_func}, K, sim_func)
    queries = rng.standard_normal((70, DIM)).astype(np.float32)

    dists, nbr_vals = retriever.search(torch.from_numpy(queries))[:2]

    _, ids = index.search(queries, K)
    exact = keys.astype(np.float64)[ids]  # (n, K, DIM)
    if sim_func == "l2":
        expected = ((exact - queries[:, None, :]) ** 2).sum(-1)
    else:
        expected = -(exact * queries[:, None, :]).sum(-1)
    np.testing.assert_allclose(dists.numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(nbr_vals.numpy(), vals[ids])


def test_recompute_refuses_ids_beyond_the_store(tmp_path):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((SIZE, DIM)).astype(np.float32)
    store = write_store(tmp_path / "dstore", keys, np.zeros(SIZE, dtype=np.int64), np.float32, 1)
    index = faiss.IndexFlatL2(DIM)
    index.add(np.concatenate([keys, keys]))  # an index of another, larger store
    with pytest.raises(ValueError, match="rebuild the index"):
        KNNRetriever(store, index, {"metric": "l2"}, SIZE + 10, "l2")
