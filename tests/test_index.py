"""The FAISS index builder: exactness, recall, ids, resuming, refusals (real FAISS)."""

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from fairseq_knnlm.cli.build_index import main as cli_main
from fairseq_knnlm.storage.datastore import Datastore, DatastoreError, DatastoreWriter, shard_dirname
from fairseq_knnlm.index import (
    IndexBuildError,
    IndexMismatchError,
    build_index,
    default_factory,
    default_index_path,
    load_index,
    meta_path,
    partial_paths,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, DIM = 20_000, 64
META = dict(keytype="last_ffn_input", dictionary_md5="0" * 32, checkpoint_sha256="0" * 64)
# IVF-PQ small enough to train in about a second here; recall bounds for it
# on the clustered keys below at nprobe 8 (measured: 1.00 / 0.77 / 0.89).
IVFPQ = "IVF64,PQ8"
RECALL_BOUNDS = {"recall@1": 0.9, "recall@10": 0.6, "recall@100": 0.75}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered_keys(n, dim, seed=0, latent=8, clusters=64):
    """Keys near a low-dimensional mixture, like LM hidden states (no exact ties)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, latent)) * 4
    proj = rng.standard_normal((latent, dim)) / np.sqrt(latent)
    z = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, latent))
    return (z @ proj + 0.05 * rng.standard_normal((n, dim))).astype(np.float32)


def value_of(positions):
    return (np.asarray(positions) * 7919 % 50_000).astype(np.int32)


def write_store(path, keys, dtype=np.float16, shards=1):
    bounds = np.linspace(0, len(keys), shards + 1).astype(int)
    for s in range(shards):
        target = path if shards == 1 else os.path.join(path, shard_dirname(s, shards))
        w = DatastoreWriter(str(target), keys.shape[1], dtype)
        w.append(keys[bounds[s] : bounds[s + 1]], value_of(np.arange(bounds[s], bounds[s + 1])))
        w.commit(META)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store") / "dstore", clustered_keys(N, DIM))


@pytest.fixture(scope="module")
def ivfpq(store, tmp_path_factory):
    """(path, metadata, log) of an IVF-PQ index of ``store`` with measured recall."""
    out = str(tmp_path_factory.mktemp("ivfpq") / "knn.index")
    log = []
    meta = build_index(store, output=out, factory=IVFPQ, eval_recall=500, nprobe=8,
                       progress=False, log=log.append)
    return out, meta, log


def build(store, output, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda msg: None)
    return build_index(store, output=str(output), **kw)


def exact_neighbours(keys, queries, k, metric="l2"):
    keys, queries = keys.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        scores = (queries ** 2).sum(1)[:, None] - 2 * queries @ keys.T + (keys ** 2).sum(1)[None]
    else:
        scores = -queries @ keys.T
    ids = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n not in ("keys.npy", "vals.npy", "meta.json"))


# ---------------------------------------------------------------- exactness and ids


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_returns_exact_neighbours(store, tmp_path, metric):
    out = tmp_path / "flat.index"
    meta = build(store, out, factory="Flat", metric=metric, eval_recall=200)
    ds = Datastore(store)
    index, loaded = load_index(out, ds)
    assert loaded["metric"] == metric and loaded["ntotal"] == N and loaded["path"] == str(out)
    keys = np.asarray(ds.keys, dtype=np.float32)
    queries = clustered_keys(50, DIM, seed=1)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = exact_neighbours(keys, queries, 10, metric)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores if metric == "l2" else -scores, want_scores, rtol=1e-4, atol=1e-3)
    assert meta["recall"]["recall@1"] == meta["recall"]["recall@100"] == 1.0


def test_ids_are_positions_across_shards(tmp_path):
    keys = clustered_keys(3000, 32, seed=2)
    store = write_store(tmp_path / "sharded", keys, dtype=np.float32, shards=3)
    out = tmp_path / "knn.index"
    build(store, out, factory="Flat", add_batch=700)  # chunks straddle shard boundaries
    ds = Datastore(store)
    index, _ = load_index(out, ds)
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), keys)
    _, ids = index.search(keys[::100], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 3000, 100))
    np.testing.assert_array_equal(ds.vals[ids[:, 0]], value_of(np.arange(0, 3000, 100)))


def test_ivfpq_recall_above_bound_and_metadata(store, ivfpq):
    out, meta, log = ivfpq
    ds = Datastore(store)
    recall = meta["recall"]
    for k, bound in RECALL_BOUNDS.items():
        assert recall[k] >= bound, recall
    assert recall["queries"] == 500 and recall["nprobe"] == 8
    # The default --train-size (1M) exceeds the store: clamped, with a message.
    assert any("training on all of them" in line for line in log)
    with open(meta_path(out)) as f:
        on_disk = json.load(f)
    assert on_disk == meta
    assert meta["factory"] == IVFPQ and meta["metric"] == "l2" and meta["ntotal"] == N
    assert meta["datastore_fingerprint"] == ds.fingerprint and meta["datastore_size"] == N
    assert meta["train_size"] == N and meta["seed"] == 1
    assert meta["train_seconds"] > 0 and meta["add_seconds"] > 0
    assert not any(os.path.exists(p) for p in partial_paths(out))

    # Independently of the built-in measure: the loaded index's top-10 vs numpy's.
    index, _ = load_index(out, ds, nprobe=8)
    assert faiss.extract_index_ivf(index).nprobe == 8
    keys = np.asarray(ds.keys, dtype=np.float32)
    queries = keys[np.arange(0, N, 97)]
    _, ids = index.search(queries, 10)
    _, want = exact_neighbours(keys, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
    assert overlap >= RECALL_BOUNDS["recall@10"]
    # Neighbour ids index vals directly: a stored key finds itself first.
    assert np.mean(ds.vals[ids[:, 0]] == value_of(np.arange(0, N, 97))) >= RECALL_BOUNDS["recall@1"]


def test_real_datastore_recall(tiny_datastore, tmp_path):
    """IVF-PQ over a tiny LM's WikiText-2 keys, against exact search.

    Measured on the 76k x 64 store: recall@1 0.89, recall@10 0.70 at nprobe 16.
    """
    ds = Datastore(str(tiny_datastore))
    meta = build(ds, tmp_path / "knn.index", factory="IVF64,PQ8", train_size=20_000,
                 eval_recall=500, nprobe=16)
    assert meta["ntotal"] == ds.size
    assert meta["recall"]["recall@1"] >= 0.8, meta["recall"]
    assert meta["recall"]["recall@10"] >= 0.5, meta["recall"]


# ---------------------------------------------------------------- defaults


def test_default_factory_adapts_to_small_stores_and_dims():
    assert default_factory(1_000_000, 1024) == ("IVF4096,PQ64", None)
    factory, note = default_factory(20_000, 64)
    assert factory == "IVF512,PQ64" and "512 centroids" in note
    factory, note = default_factory(1_000_000, 100)
    assert factory == "IVF4096,PQ50" and "must divide dim 100" in note
    factory, note = default_factory(5_000, 64)
    assert factory == "Flat" and "exact search" in note
    for n, dim in ((20_000, 64), (100_000, 48), (500_000, 1024)):
        factory, _ = default_factory(n, dim)
        faiss.index_factory(dim, factory)  # FAISS accepts every default


def test_default_on_a_small_store_is_flat_and_says_so(tmp_path):
    store = write_store(tmp_path / "small", clustered_keys(500, 16))
    log = []
    meta = build(store, default_index_path(store), log=log.append)
    assert meta["factory"] == "Flat" and meta["train_size"] == 0
    assert any("using exact search (Flat)" in line for line in log)
    assert os.path.exists(os.path.join(store, "knn.index.meta.json"))


# ---------------------------------------------------------------- resuming


class Crash(Exception):
    pass


def crash_after(chunks, exc=Crash):
    def on_chunk(added):
        on_chunk.calls += 1
        if on_chunk.calls == chunks:
            raise exc()
    on_chunk.calls = 0
    return on_chunk


RESUME = dict(factory=IVFPQ, train_size=8000, add_batch=3000)


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    """Bytes of an index built in one go with the RESUME settings."""
    out = tmp_path_factory.mktemp("uninterrupted") / "knn.index"
    build(store, out, **RESUME)
    return out.read_bytes()


def test_resume_after_interruption_equals_uninterrupted_build(store, uninterrupted, tmp_path):
    settings = RESUME
    out = tmp_path / "resumed.index"
    part_index, part_state = partial_paths(out)
    # A crash after 3 of 7 chunks, checkpointing after every chunk.
    with pytest.raises(Crash):
        build(store, out, checkpoint_every=0, on_chunk=crash_after(3), **settings)
    assert not out.exists() and not os.path.exists(meta_path(out))
    assert faiss.read_index(part_index).ntotal == 9000
    log = []
    meta = build(store, out, log=log.append, **settings)
    assert any("resuming" in line and "9000 of 20000" in line for line in log)
    assert meta["resumed"] == 1
    assert out.read_bytes() == uninterrupted
    assert not os.path.exists(part_index) and not os.path.exists(part_state)


def test_crash_between_checkpoints_keeps_the_training(store, uninterrupted, tmp_path):
    settings = RESUME
    out = tmp_path / "knn.index"
    # No periodic checkpoint is due: only the trained index survives the crash.
    with pytest.raises(Crash):
        build(store, out, on_chunk=crash_after(2), **settings)
    assert faiss.read_index(partial_paths(out)[0]).ntotal == 0
    # Ctrl-C saves what was added so far.
    log = []
    with pytest.raises(KeyboardInterrupt):
        build(store, out, on_chunk=crash_after(2, KeyboardInterrupt), log=log.append, **settings)
    assert any("0 of 20000" in line for line in log)
    assert faiss.read_index(partial_paths(out)[0]).ntotal == 6000
    build(store, out, **settings)
    assert out.read_bytes() == uninterrupted


def test_partial_build_with_other_settings_is_discarded(store, tmp_path):
    out = tmp_path / "knn.index"
    with pytest.raises(Crash):
        build(store, out, factory="Flat", add_batch=5000, checkpoint_every=0, on_chunk=crash_after(1))
    log = []
    meta = build(store, out, factory="Flat", metric="ip", log=log.append)
    assert any("discarding" in line and "metric" in line for line in log)
    assert meta["resumed"] == 0 and meta["ntotal"] == N


# ---------------------------------------------------------------- refusals


def refuse(exc_type, match, *args, **kwargs):
    with pytest.raises(exc_type, match=match) as info:
        build(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_refusals_leave_nothing_behind(store, tmp_path):
    out = tmp_path / "knn.index"
    refuse(DatastoreError, "no datastore", str(tmp_path / "missing"), out)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "keys.npy").write_bytes(b"")
    refuse(DatastoreError, "not a complete datastore", str(incomplete), out)
    refuse(IndexBuildError, "FAISS rejects --index-factory 'IVF64,PQ7x'", store, out, factory="IVF64,PQ7x")
    refuse(IndexBuildError, "FAISS rejects", store, out, factory="IVF64,PQ7")  # 7 does not divide 64
    refuse(IndexBuildError, "4096 centroids but only 1000 training keys", store, out,
           factory="IVF4096,PQ8", train_size=1000)
    refuse(IndexBuildError, "--metric must be one of", store, out, metric="cosine")
    refuse(IndexBuildError, "--add-batch must be at least 1", store, out, add_batch=0)
    refuse(IndexBuildError, "directory .* does not exist", store, tmp_path / "no" / "knn.index")
    if not hasattr(faiss, "StandardGpuResources"):
        refuse(IndexBuildError, "no GPU support", store, out, gpu=True)
    assert os.listdir(tmp_path) == ["incomplete"] and leftovers(store) == []


def test_existing_index_needs_overwrite(store, tmp_path):
    out = tmp_path / "knn.index"
    build(store, out, factory="Flat")
    refuse(IndexBuildError, "already holds a complete index of this datastore; pass --overwrite",
           store, out, factory="Flat")
    other = write_store(tmp_path / "other", clustered_keys(300, DIM, seed=5))
    refuse(IndexBuildError, "holds an index of another datastore", other, out, factory="Flat")
    meta = build(store, out, factory="Flat", metric="ip", overwrite=True)
    assert load_index(out, store)[1]["metric"] == meta["metric"] == "ip"


def test_load_index_checks_the_datastore(store, tmp_path):
    out = tmp_path / "knn.index"
    build(store, out, factory="Flat")
    other = write_store(tmp_path / "other", clustered_keys(300, DIM, seed=5))
    with pytest.raises(IndexMismatchError, match=r"was built for another datastore \(.*/store\d*/dstore\); "
                       "rebuild it with fairseq-knnlm-build-index --dstore"):
        load_index(out, Datastore(other))
    os.remove(meta_path(out))
    with pytest.raises(IndexBuildError, match="incomplete"):
        load_index(out, store)
    with pytest.raises(IndexBuildError, match="no index at"):
        load_index(tmp_path / "missing.index", store)


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        cli_main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_errors_are_one_line_exit_2(store, tmp_path, capsys):
    out = tmp_path / "x.index"
    last = cli_error(capsys, "--dstore", store, "--output", out, "--index-factory", "Bogus")
    assert last.startswith("fairseq-knnlm-build-index: error: FAISS rejects --index-factory 'Bogus'")
    assert os.listdir(tmp_path) == []
    last = cli_error(capsys, "--dstore", tmp_path / "nope")
    assert last.startswith("fairseq-knnlm-build-index: error: no datastore at")
    assert cli_main(["--dstore", store, "--output", str(out), "--index-factory", "Flat", "--quiet"]) == 0
    last = cli_error(capsys, "--dstore", store, "--output", out, "--index-factory", "Flat")
    assert "already holds a complete index" in last and "--overwrite" in last


def test_cli_end_to_end(store, tmp_path):
    out = tmp_path / "knn.index"
    cmd = [sys.executable, "-m", "fairseq_knnlm.cli.build_index", "--dstore", store,
           "--index-factory", "Flat", "--output", str(out), "--eval-recall", "100", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ntotal"] == N and summary["recall"]["recall@10"] == 1.0
    assert "recall@1 1.0000" in proc.stderr
