"""Failures of pruning and import that are not what the tools used to take them for.

A prune checkpoint that cannot be read for a reason other than damage must
stop the run and stay on disk (it may stand for hours of merging); an import
whose checkpoint is unreadable must say so, not blame the dictionary.
"""

import os
import shutil

import numpy as np
import pytest
import torch

from fairseq_knnlm.index import build_index
from fairseq_knnlm.storage.datastore import Datastore, DatastoreWriter
from fairseq_knnlm.tools.importer import OriginalImportError, import_original
from fairseq_knnlm.tools.prune import PLAN_FILE, STATE_FILE, STATE_SUFFIX, prune_datastore

ENTRIES = 600


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def small_store(artefacts, tiny_datastore):
    """The tiny LM's first ENTRIES datastore entries, with an exact index."""
    source = Datastore(tiny_datastore)
    path = artefacts / "defects-store"
    writer = DatastoreWriter(path, source.dim, source.keys.dtype)
    writer.append(np.asarray(source.keys[:ENTRIES]), np.asarray(source.vals[:ENTRIES]))
    writer.commit({k: v for k, v in source.meta.items() if k not in ("id", "size", "created")})
    build_index(str(path), factory="Flat", progress=False, log=quiet)
    return Datastore(path)


def interrupt_at_200(visited):
    """prune_datastore's on_batch: Ctrl-C once 200 entries are visited (a checkpoint then exists)."""
    if visited >= 200:
        raise KeyboardInterrupt


def test_a_checkpoint_that_cannot_be_read_for_another_reason_stops_the_run_and_is_kept(tmp_path, small_store):
    out = tmp_path / "pruned"
    with pytest.raises(KeyboardInterrupt):
        prune_datastore(small_store.path, out, k=4, batch_size=100, progress=False, log=quiet, on_batch=interrupt_at_200)
    state_dir = tmp_path / ("pruned" + STATE_SUFFIX)
    state = state_dir / STATE_FILE
    saved = state.read_bytes()

    # The state file is there but cannot be opened (a directory stands in its place):
    # an OSError, not a damaged file.
    state.unlink()
    (state / "inside").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        prune_datastore(small_store.path, out, k=4, batch_size=100, progress=False, log=quiet)
    assert (state_dir / PLAN_FILE).exists() and (state / "inside").is_dir()
    assert not out.exists()

    # Readable again: the run continues from the kept checkpoint.
    shutil.rmtree(state)
    state.write_bytes(saved)
    messages = []
    prune_datastore(small_store.path, out, k=4, batch_size=100, progress=False, log=messages.append)
    assert any("resuming" in m and "200" in m for m in messages), messages
    straight = tmp_path / "straight"
    prune_datastore(small_store.path, straight, k=4, batch_size=100, progress=False, log=quiet)
    assert np.array_equal(Datastore(out).counts, Datastore(straight).counts)


def test_a_damaged_checkpoint_is_discarded_and_the_run_starts_over(tmp_path, small_store):
    out = tmp_path / "pruned"
    with pytest.raises(KeyboardInterrupt):
        prune_datastore(small_store.path, out, k=4, batch_size=100, progress=False, log=quiet, on_batch=interrupt_at_200)
    state = tmp_path / ("pruned" + STATE_SUFFIX) / STATE_FILE
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    messages = []
    prune_datastore(small_store.path, out, k=4, batch_size=100, progress=False, log=messages.append)
    assert any("discarding" in m for m in messages) and not any("resuming" in m for m in messages)


@pytest.fixture(scope="module")
def original_files(artefacts, small_store):
    """small_store in the original code's format: headerless float32 keys, int64 values."""
    prefix = artefacts / "defects-orig" / "dstore"
    prefix.parent.mkdir()
    np.asarray(small_store.keys, dtype=np.float32).tofile(f"{prefix}_keys.npy")
    np.asarray(small_store.vals, dtype=np.int64).tofile(f"{prefix}_vals.npy")
    return str(prefix)


def importing(original_files, small_store, checkpoint, data_bin, out):
    return import_original(original_files, ENTRIES, small_store.dim, False, str(checkpoint), str(data_bin),
                           str(out), first_token=0, progress=False, log=quiet)


def test_an_unreadable_checkpoint_is_not_reported_as_another_dictionary(tmp_path, original_files, small_store,
                                                                        tiny_lm, data_bin):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(open(tiny_lm, "rb").read()[: os.path.getsize(tiny_lm) // 2])
    with pytest.raises(OriginalImportError) as e:
        importing(original_files, small_store, damaged, data_bin, tmp_path / "out")
    message = str(e.value)
    assert message.startswith(f"cannot read checkpoint {damaged}") and "damaged" in message, message
    assert "dictionary" not in message and "\n" not in message

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(OriginalImportError, match="is not a fairseq checkpoint"):
        importing(original_files, small_store, foreign, data_bin, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
