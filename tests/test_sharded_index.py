"""Sharded index builds: train once, add shards apart, merge on disk or search in place (real FAISS).

The reference everywhere is the index built whole with the same settings:
the same training sample and FAISS seeds give the same trained index, so the
pieces' results must equal the whole index's exactly.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest

from fairseq_knnlm.cli.build_index import main as cli_main
from fairseq_knnlm.storage.datastore import Datastore
from fairseq_knnlm.index import (
    IndexBuildError, IndexMismatchError, build_index, load_index, meta_path, open_index, partial_paths,
)
from fairseq_knnlm.index.shards import (
    add_shard, find_shards, load_index_shards, merge_shards, shard_index_name, shard_span, train_only,
)
from test_index import Crash, clustered_keys, crash_after, write_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, DIM = 12_000, 32
SETTINGS = dict(factory="IVF32,PQ8", train_size=4000, seed=3)
QUIET = dict(progress=False, log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def keys():
    return clustered_keys(N, DIM, seed=5)


@pytest.fixture(scope="module")
def stores(keys, tmp_path_factory):
    """The same keys as one store and as a store written by 3 pass shards."""
    root = tmp_path_factory.mktemp("stores")
    return write_store(root / "single", keys), write_store(root / "sharded", keys, shards=3)


@pytest.fixture(scope="module")
def whole(stores, tmp_path_factory):
    """The single store's index built whole."""
    out = tmp_path_factory.mktemp("whole") / "knn.index"
    build_index(stores[0], output=str(out), **SETTINGS, **QUIET)
    return str(out)


def build_pieces(store, index_dir, num_shards, **kw):
    os.makedirs(index_dir, exist_ok=True)
    trained = os.path.join(index_dir, "trained.index")
    train_only(store, trained, **SETTINGS, **QUIET)
    for s in range(num_shards):
        add_shard(store, trained, s, num_shards, add_batch=2500, **QUIET, **kw)
    return str(index_dir)


@pytest.fixture(scope="module")
def pieces(stores, tmp_path_factory):
    """The sharded store's index in 3 pieces (split along its pass shards)."""
    return build_pieces(stores[1], tmp_path_factory.mktemp("pieces") / "idx", 3)


def test_spans_follow_pass_shards_or_split_evenly(stores):
    single, sharded = Datastore(stores[0]), Datastore(stores[1])
    sizes = [s.size for s in sharded.shards]
    assert [shard_span(sharded, i, 3) for i in range(3)] == [
        (sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(3)]
    assert [shard_span(single, i, 2) for i in range(2)] == [(0, N // 2), (N // 2, N)]
    with pytest.raises(IndexBuildError, match="--shard-id must be in"):
        shard_span(single, 2, 2)


def test_pieces_merged_and_in_place_equal_the_whole_index(stores, whole, pieces, keys):
    queries = keys[::97] + 0.01
    ds = Datastore(stores[1])
    ref_d, ref_i = load_index(whole, Datastore(stores[0]), nprobe=8)[0].search(queries, 100)
    # in place, all shards in one process
    index, meta = open_index(pieces, ds, nprobe=8)
    assert meta["num_shards"] == 3 and meta["local_ntotal"] == N and index.ntotal == N
    d, i = index.search(queries, 100)
    assert np.array_equal(d, ref_d) and np.array_equal(i, ref_i)
    # one shard alone holds its own rows, with datastore positions as ids
    part, pmeta = open_index(pieces, ds, nprobe=8, shard_ids=[1])
    first, end = shard_span(ds, 1, 3)
    _, own = part.search(queries, 10)
    assert pmeta["local_ntotal"] == end - first and ((own >= first) & (own < end)).all()
    # merged: inverted lists on disk; the pair of files can move
    merged = merge_shards(pieces, **QUIET)
    assert merged["ondisk"] == "knn.ivfdata" and merged["ntotal"] == N
    moved = os.path.join(os.path.dirname(pieces), "moved")
    os.makedirs(moved)
    for name in ("knn.index", "knn.index.meta.json", "knn.ivfdata"):
        shutil.move(os.path.join(pieces, name), moved)
    index, _ = open_index(os.path.join(moved, "knn.index"), ds, nprobe=8)
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists), faiss.OnDiskInvertedLists)
    d, i = index.search(queries, 100)
    assert np.array_equal(d, ref_d) and np.array_equal(i, ref_i)
    # the whole index memory-mapped: the same results
    index, _ = open_index(whole, Datastore(stores[0]), nprobe=8, mmap=True)
    d, i = index.search(queries, 100)
    assert np.array_equal(d, ref_d) and np.array_equal(i, ref_i)
    # a lost .ivfdata is named, not a crash
    os.remove(os.path.join(moved, "knn.ivfdata"))
    with pytest.raises(IndexBuildError, match="inverted lists .* are missing"):
        open_index(os.path.join(moved, "knn.index"), ds)


def test_even_split_of_a_single_store(stores, whole, keys, tmp_path):
    idx = build_pieces(stores[0], tmp_path / "idx", 2)
    queries = keys[::211]
    ref = load_index(whole, Datastore(stores[0]), nprobe=8)[0].search(queries, 50)
    got = open_index(idx, Datastore(stores[0]), nprobe=8)[0].search(queries, 50)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_pieces_that_do_not_belong_together_are_refused(stores, pieces, tmp_path):
    ds = Datastore(stores[1])
    idx = tmp_path / "idx"
    shutil.copytree(pieces, idx, ignore=shutil.ignore_patterns("knn.*"))
    # a shard added to another training of the same store
    other = tmp_path / "other"
    other.mkdir()
    train_only(stores[1], str(other / "trained.index"), **SETTINGS, **QUIET)
    add_shard(stores[1], str(other / "trained.index"), 2, 3, **QUIET)
    name = shard_index_name(2, 3)
    for suffix in ("", ".meta.json"):
        shutil.copy(other / (name + suffix), idx / (name + suffix))
    with pytest.raises(IndexMismatchError, match="disagree on trained_id"):
        find_shards(str(idx))
    # a missing shard
    for suffix in ("", ".meta.json"):
        os.remove(idx / (name + suffix))
    with pytest.raises(IndexBuildError, match=r"lacks index shard\(s\) 2 of 3"):
        open_index(str(idx), ds)
    # a shard cut short
    shutil.copy(os.path.join(pieces, name), idx / name)
    shutil.copy(meta_path(os.path.join(pieces, name)), meta_path(str(idx / name)))
    with open(idx / name, "r+b") as f:
        f.truncate(os.path.getsize(idx / name) // 2)
    with pytest.raises(IndexBuildError, match="changed size"):
        find_shards(str(idx))
    # the pieces of one store searched over another
    with pytest.raises(IndexMismatchError, match="another datastore"):
        load_index_shards(pieces, Datastore(stores[0]))
    with pytest.raises(IndexMismatchError, match="trained for another datastore"):
        add_shard(stores[0], os.path.join(pieces, "trained.index"), 0, 2, **QUIET)
    # merging pieces whose trained index was replaced
    shutil.copy(other / "trained.index", idx / "trained.index")
    shutil.copy(other / "trained.index.meta.json", idx / "trained.index.meta.json")
    shutil.copy(os.path.join(pieces, name), idx / name)
    with pytest.raises(IndexMismatchError, match="another trained index"):
        merge_shards(str(idx), **QUIET)


def test_refusals_of_kinds_that_cannot_be_sharded_or_merged(stores, tmp_path):
    with pytest.raises(IndexBuildError, match="needs an IVF index"):
        train_only(stores[0], str(tmp_path / "t.index"), factory="Flat", **QUIET)
    idx = tmp_path / "fs"
    idx.mkdir()
    train_only(stores[0], str(idx / "trained.index"), factory="IVF32,PQ8x4fs", train_size=4000, **QUIET)
    add_shard(stores[0], str(idx / "trained.index"), 0, 1, **QUIET)
    with pytest.raises(IndexBuildError, match="fast-scan .* search the shards in place"):
        merge_shards(str(idx), **QUIET)
    assert sorted(os.listdir(idx)) == sorted(
        ["trained.index", "trained.index.meta.json", "shard-000-of-001.index", "shard-000-of-001.index.meta.json"])


def test_shard_add_resumes_after_a_crash(stores, pieces, tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    for name in ("trained.index", "trained.index.meta.json"):
        shutil.copy(os.path.join(pieces, name), idx / name)
    name = shard_index_name(1, 3)
    out = idx / name
    with pytest.raises(Crash):
        add_shard(stores[1], str(idx / "trained.index"), 1, 3, add_batch=1000, checkpoint_every=0,
                  on_chunk=crash_after(2), **QUIET)
    assert not out.exists() and faiss.read_index(partial_paths(out)[0]).ntotal == 2000
    meta = add_shard(stores[1], str(idx / "trained.index"), 1, 3, add_batch=1000, **QUIET)
    assert meta["resumed"] == 1
    assert faiss.serialize_index(faiss.read_index(str(out))).tobytes() == \
        faiss.serialize_index(faiss.read_index(os.path.join(pieces, name))).tobytes()


def cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "fairseq_knnlm.cli.build_index", "--quiet", *map(str, args)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def killed_then_rerun(args, rng, done):
    """Run the CLI, SIGKILL it at a random moment, check nothing complete is
    left unless it finished, rerun to completion."""
    t0 = time.monotonic()
    proc = cli(*args)
    proc.communicate()
    assert proc.returncode == 0
    duration = time.monotonic() - t0
    for attempt in range(2):
        for path in done():
            if os.path.exists(path):
                os.remove(path)
        proc = cli(*args, "--overwrite")
        time.sleep(rng.uniform(0.3, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out = proc.stdout.read()
        assert "Traceback" not in out
        finished = all(os.path.exists(p) for p in done())
        if not finished:
            assert not any(os.path.exists(p) for p in done() if p.endswith(".meta.json"))
    proc = cli(*args)
    out, _ = proc.communicate()
    assert proc.returncode in (0, 2), out  # 2: the killed run had finished


def test_kill9_during_shard_add_and_merge(stores, pieces, tmp_path):
    """SIGKILL at random moments; the reruns end with the same files."""
    rng = random.Random(12)
    idx = tmp_path / "idx"
    shutil.copytree(pieces, idx, ignore=shutil.ignore_patterns("knn.*", "shard-002*"))
    name = shard_index_name(2, 3)
    shard = str(idx / name)
    killed_then_rerun(["--dstore", stores[1], "--trained", idx / "trained.index", "--shard-id", 2,
                       "--num-shards", 3, "--add-batch", 500, "--checkpoint-every", 0],
                      rng, lambda: [shard, meta_path(shard)])
    assert faiss.serialize_index(faiss.read_index(shard)).tobytes() == \
        faiss.serialize_index(faiss.read_index(os.path.join(pieces, name))).tobytes()
    merged = str(idx / "knn.index")
    killed_then_rerun(["--merge", idx], rng, lambda: [merged, meta_path(merged)])
    ds = Datastore(stores[1])
    queries = clustered_keys(50, DIM, seed=9)
    got = open_index(merged, ds, nprobe=8)[0].search(queries, 20)
    ref = open_index(pieces, ds, nprobe=8)[0].search(queries, 20)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_cli_modes_and_one_line_errors(stores, tmp_path, capsys):
    idx = tmp_path / "idx"
    idx.mkdir()
    trained = idx / "trained.index"
    assert cli_main(["--dstore", stores[0], "--train-only", "--output", str(trained), "--index-factory",
                     "IVF32,PQ8", "--train-size", "4000", "--quiet"]) == 0
    for s in range(2):
        assert cli_main(["--dstore", stores[0], "--trained", str(trained), "--shard-id", str(s),
                         "--num-shards", "2", "--quiet"]) == 0
    assert cli_main(["--merge", str(idx), "--dstore", stores[0], "--eval-recall", "200", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ondisk"] == "knn.ivfdata" and summary["ntotal"] == N and summary["recall"]["recall@1"] > 0.5
    for argv, message in [
        (["--merge", str(idx)], "already complete; pass --overwrite"),
        (["--dstore", stores[0], "--trained", str(idx / "knn.index"), "--shard-id", "0", "--num-shards", "2"],
         "is not a trained index"),
        (["--merge", str(tmp_path)], "holds no index shards"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli_main(argv + ["--quiet"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        cli_main(["--dstore", stores[0], "--trained", str(trained), "--quiet"])
    assert "--trained needs --shard-id" in capsys.readouterr().err
