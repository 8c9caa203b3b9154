"""fairseq-knnlm-prefix: the datastore of the first N entries of another, keys referenced in place."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import eval_lm_in_process, run
from fairseq_knnlm.cli.prefix import main as prefix_main
from fairseq_knnlm.index import build_index
from fairseq_knnlm.storage.datastore import Datastore, DatastoreError, DatastoreWriter, shard_dirname
from fairseq_knnlm.tools.prefix import PrefixError, prefix_entries, write_prefix

PREFIX = [sys.executable, "-m", "fairseq_knnlm.cli.prefix"]
ENTRIES = 5000
TEMP, LMBDA, K = 5.0, 0.5, 64


def quiet(msg):
    pass


def parent_meta(source):
    """What a writer of a store made from ``source`` keeps of its meta.json."""
    return {k: v for k, v in source.meta.items() if k not in ("id", "size", "created", "format_version", "num_shards")}


def write_copy(path, source, n, counts=None):
    """The store of ``source``'s first n entries, keys and values copied by DatastoreWriter."""
    writer = DatastoreWriter(str(path), source.dim, source.keys.dtype, with_counts=counts is not None)
    writer.append(np.asarray(source.keys[:n]), np.asarray(source.vals[:n]),
                  None if counts is None else counts[:n])
    writer.commit(parent_meta(source))
    return path


def ivf_index(dstore):
    """A trained index (IVF, seeded): the same keys give the same index."""
    path = os.path.join(str(dstore), "knn.index")
    build_index(str(dstore), output=path, factory="IVF32,Flat", train_size=ENTRIES, seed=1, nprobe=8,
                progress=False, log=quiet)
    return path


def test_prefix_counts():
    assert prefix_entries(100, entries=1) == 1
    assert prefix_entries(100, entries=100) == 100
    assert prefix_entries(100, fraction=0.125) == 12   # round half to even, as Python rounds
    assert prefix_entries(100, fraction=0.126) == 13
    assert prefix_entries(8, fraction=1.0) == 8
    for kwargs, words in ((dict(entries=0), "1 to the store's 100"), (dict(entries=101), "1 to the store's 100"),
                          (dict(fraction=0.0), r"\(0, 1\]"), (dict(fraction=1.5), r"\(0, 1\]"),
                          (dict(fraction=0.001), "larger --fraction"), ({}, "exactly one"),
                          (dict(entries=5, fraction=0.5), "exactly one")):
        with pytest.raises(PrefixError, match=words):
            prefix_entries(100, **kwargs)


@pytest.fixture(scope="module")
def prefix_store(artefacts, tiny_datastore):
    out = artefacts / "prefix-5000"
    proc = run([*PREFIX, "--dstore", tiny_datastore, "--entries", ENTRIES, "--output", out])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["size"] == ENTRIES
    return out


def test_prefix_is_the_parents_first_rows_without_copied_keys(prefix_store, tiny_datastore):
    parent, store = Datastore(str(tiny_datastore)), Datastore(str(prefix_store))
    assert store.size == ENTRIES < parent.size
    assert np.array_equal(np.asarray(store.keys), np.asarray(parent.keys[:ENTRIES]))
    assert np.array_equal(store.vals, parent.vals[:ENTRIES])
    assert sorted(os.listdir(prefix_store)) == ["meta.json", "vals.npy"]  # keys stay in the parent
    assert os.path.getsize(prefix_store / "vals.npy") < 128 + 4 * ENTRIES + 1
    meta = json.loads((prefix_store / "meta.json").read_text())
    assert meta["prefix_of"] == dict(path=parent.path, fingerprint=parent.fingerprint, entries=ENTRIES,
                                     parent_entries=parent.size)
    assert meta["external_keys"]["path"] == os.path.join(parent.path, "keys.npy")
    assert meta["vals_range"] == [int(parent.vals[:ENTRIES].min()), int(parent.vals[:ENTRIES].max())]
    for field in ("checkpoint_sha256", "dictionary_md5", "keytype", "context_window", "split", "dim"):
        assert meta[field] == parent.meta[field]
    assert meta["id"] != parent.meta["id"]
    store.check_values(int(parent.vals.max()) + 1, full=True)  # every key read through the reference

    # A prefix of a prefix references the same file.
    inner = write_prefix(str(prefix_store), str(prefix_store) + "-of-prefix", entries=100)
    assert inner["external_keys"]["path"] == meta["external_keys"]["path"]
    assert inner["prefix_of"]["path"] == store.path
    assert np.array_equal(np.asarray(Datastore(str(prefix_store) + "-of-prefix").keys), np.asarray(parent.keys[:100]))


def test_index_and_knnlm_over_the_prefix_equal_a_written_copy(artefacts, data_bin, tiny_lm, tiny_datastore,
                                                              prefix_store):
    parent = Datastore(str(tiny_datastore))
    copy = write_copy(artefacts / "copy-5000", parent, ENTRIES)
    import faiss

    indexes = [faiss.read_index(ivf_index(d)) for d in (prefix_store, copy)]
    assert faiss.serialize_index(indexes[0]).tobytes() == faiss.serialize_index(indexes[1]).tobytes()
    ppl = [eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", d, "--k", K, "--knn-temp", TEMP,
                              "--lmbda", LMBDA, "--probe", 8) for d in (prefix_store, copy)]
    assert ppl[0] == ppl[1]  # full float precision, so also every printed digit


def test_refusals(artefacts, tmp_path, tiny_datastore, prefix_store, capsys):
    parent = Datastore(str(tiny_datastore))

    def refused(argv, *words):
        """The console script's main() in this process: exit 2, one line naming the fix."""
        with pytest.raises(SystemExit) as ended:
            prefix_main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert ended.value.code == 2, err
        lines = [line for line in err.strip().splitlines() if "error" in line]  # argparse adds its usage
        assert len(lines) == 1 and lines[0].startswith("fairseq-knnlm-prefix: error: "), err
        assert "Traceback" not in err
        for w in words:
            assert w in lines[0], lines[0]

    # The console script itself, once: one line, exit 2, no traceback.
    proc = run([*PREFIX, "--dstore", tiny_datastore, "--entries", parent.size + 1, "--output", tmp_path / "a"],
               check=False)
    errors = [line for line in proc.stdout.strip().splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert errors == [f"fairseq-knnlm-prefix: error: --entries must be 1 to the store's {parent.size:,} entries, "
                      f"got {parent.size + 1:,}"], proc.stdout
    refused(["--dstore", tiny_datastore, "--entries", parent.size + 1, "--output", tmp_path / "a"],
            f"1 to the store's {parent.size:,} entries")
    refused(["--dstore", tiny_datastore, "--entries", 0, "--output", tmp_path / "a"], "at least 1")
    refused(["--dstore", tiny_datastore, "--fraction", 1.5, "--output", tmp_path / "a"], "(0, 1]")
    refused(["--dstore", tiny_datastore, "--entries", 10, "--output", prefix_store], "--overwrite")
    refused(["--dstore", tiny_datastore, "--entries", 10, "--output", tiny_datastore, "--overwrite"],
            "would replace the store its keys are read from")
    refused(["--dstore", tmp_path / "nothing", "--entries", 10, "--output", tmp_path / "a"], "no datastore")

    sharded = tmp_path / "sharded"
    for i, (lo, hi) in enumerate(((0, 3000), (3000, 6000))):
        writer = DatastoreWriter(str(sharded / shard_dirname(i, 2)), parent.dim, parent.keys.dtype)
        writer.append(np.asarray(parent.keys[lo:hi]), parent.vals[lo:hi])
        writer.commit(dict(parent_meta(parent), shard_id=i, num_shards=2))
    refused(["--dstore", sharded, "--entries", 10, "--output", tmp_path / "a"],
            "sharded (2 shards)", f"--dstore {sharded / shard_dirname(0, 2)}", "without --num-shards")
    assert prefix_main(["--dstore", str(sharded / shard_dirname(0, 2)), "--entries", "10",
                        "--output", str(tmp_path / "of-shard")]) == 0

    pruned = write_copy(tmp_path / "pruned", parent, 1000, counts=np.ones(1000, np.int32))
    refused(["--dstore", pruned, "--fraction", 0.5, "--output", tmp_path / "a"], "pruned",
            "make the prefix of the store it was pruned from")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()

    # --overwrite replaces a complete prefix store.
    assert prefix_main(["--dstore", str(tiny_datastore), "--entries", "10", "--output", str(tmp_path / "b")]) == 0
    assert prefix_main(["--dstore", str(tiny_datastore), "--entries", "20", "--output", str(tmp_path / "b"),
                        "--overwrite"]) == 0
    assert Datastore(str(tmp_path / "b")).size == 20


def test_moved_or_changed_parent_keys_are_refused(tmp_path, tiny_datastore):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_datastore, parent)
    write_prefix(str(parent), str(tmp_path / "prefix"), fraction=0.5)
    Datastore(str(tmp_path / "prefix"))
    keys = parent / "keys.npy"
    with open(keys, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(DatastoreError, match="missing or changed size.*fairseq-knnlm-prefix --output"):
        Datastore(str(tmp_path / "prefix"))
    keys.unlink()
    with pytest.raises(DatastoreError, match="missing or changed size"):
        Datastore(str(tmp_path / "prefix"))
