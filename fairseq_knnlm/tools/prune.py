"""Datastore pruning by greedy merging (He et al., 2021, "Efficient Nearest Neighbor Language Models").

Entries are visited in corpus order.  Each entry still in the store searches
its ``k`` nearest other entries (through a FAISS index of the store); every
one of them that has the same value, is still in the store and has not itself
absorbed others in this pass is merged into it: removed, its count added to
the entry's.  Merged entries are not visited again.  The pruned store keeps
the surviving entries' keys and values in corpus order and their counts in
``counts.npy``; the kNN-LM weighs a neighbour by count * exp(-d / T), so an
entry that stands for c merged ones weighs what c copies of it would.
Counts are conserved: they sum to the entries the source stood for.

The output is written like any datastore (``OUTPUT.partial`` renamed into
place after ``meta.json``).  The merge state is checkpointed to
``OUTPUT.prune-state/`` so that an interrupted run (Ctrl-C, crash) continues
where it stopped when rerun with the same settings.
"""

import json
import os
import shutil
import sys
import time
import zipfile
import zlib
from typing import Callable, Dict, Optional

import numpy as np
from tqdm import tqdm

from ..storage.datastore import Datastore, DatastoreWriter
from ..storage.files import check_can_write, write_json_atomic
from ..errors import UserError
from ..index.files import default_index_path
from ..index.load import load_index
from ..index.reader import KeyReader

PROG = "fairseq-knnlm-prune"
STATE_SUFFIX = ".prune-state"
PLAN_FILE = "plan.json"
STATE_FILE = "state.npz"
FORMAT_VERSION = 1
WRITE_CHUNK = 1 << 16
# What numpy and zipfile raise for a truncated or corrupted state.npz or plan.json
# (json's errors are ValueErrors); anything else (a bug, MemoryError, a failing
# disk) propagates and leaves the checkpoint in place.
DAMAGED_CHECKPOINT = (ValueError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error)
# Fields the writer or this command sets on the pruned store's meta.json.
_REPLACED_META = ("id", "size", "created", "counts_dtype", "pruned", "shard_id", "num_shards")


class PruneError(UserError):
    """Pruning cannot run as asked; the message says what to do."""


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ------------------------------------------------------------ the merge rule
def merge_candidates(entry_ids: np.ndarray, neighbor_ids: np.ndarray, vals, k: int) -> np.ndarray:
    """(n, m) bool: which of the searched neighbours may be merged into each entry.

    Of each row of ``neighbor_ids`` (FAISS ids, -1 for unfilled slots) the
    first ``k`` that are other entries are considered (the entry itself is
    usually among the results and is skipped); of those, the ones whose value
    equals the entry's.
    """
    others = (neighbor_ids >= 0) & (neighbor_ids != entry_ids[:, None])
    others &= np.cumsum(others, axis=1) <= k
    neighbor_vals = np.asarray(vals[np.where(others, neighbor_ids, 0).reshape(-1)]).reshape(neighbor_ids.shape)
    return others & (neighbor_vals == np.asarray(vals[entry_ids])[:, None])


def greedy_merge(entry_ids: np.ndarray, neighbor_ids: np.ndarray, candidates: np.ndarray,
                 counts: np.ndarray, alive: np.ndarray, absorbed: np.ndarray) -> int:
    """Apply the greedy rule to entries in the given order; updates the state in place.

    ``counts`` (N,), ``alive`` (N,) bool (still in the store) and ``absorbed``
    (N,) bool (has absorbed others in this pass) describe the whole store.
    An entry that is no longer alive is skipped; a candidate is merged if it
    is alive and has absorbed nothing (so no count is ever moved twice).
    Returns the number of entries merged away.
    """
    merged = 0
    for row in np.nonzero(candidates.any(axis=1))[0]:
        i = int(entry_ids[row])
        if not alive[i]:
            continue
        for j in neighbor_ids[row][candidates[row]].tolist():
            if alive[j] and not absorbed[j]:
                alive[j] = False
                counts[i] += counts[j]
                absorbed[i] = True
                merged += 1
    return merged


# ------------------------------------------------------------ the command
def _check_args(ds: Datastore, output: str, k: int, nprobe: int, batch_size: int) -> None:
    if k < 1:
        raise PruneError(f"--merge-k must be at least 1, got {k}")
    if k >= ds.size:
        raise PruneError(f"--merge-k {k} needs more than the datastore's {ds.size} entries; lower --merge-k")
    if nprobe < 1:
        raise PruneError(f"--probe must be at least 1, got {nprobe}")
    if batch_size < 1:
        raise PruneError(f"--batch-size must be at least 1, got {batch_size}")
    if os.path.commonpath([output, ds.path]) in (output, ds.path):
        raise PruneError(f"--output {output} overlaps the source datastore {ds.path}; choose another directory")


def _load_state(state_dir: str, plan: Dict, size: int, initial_counts: np.ndarray, log):
    """(position, counts, alive, absorbed): a checkpoint with the same plan, or a fresh start."""
    plan_path, state_path = os.path.join(state_dir, PLAN_FILE), os.path.join(state_dir, STATE_FILE)
    if os.path.exists(plan_path) and os.path.exists(state_path):
        state = _read_state(state_path) if _read_plan(plan_path) == plan else None
        if state is not None and _consistent(state, size, initial_counts):
            log(f"resuming the pruning saved in {state_dir}: {state[0]:,} of {size:,} entries visited")
            return state
        log(f"discarding the unfinished pruning in {state_dir} (other settings or unreadable)")
    shutil.rmtree(state_dir, ignore_errors=True)
    os.makedirs(state_dir)
    write_json_atomic(plan_path, plan)
    return 0, initial_counts, np.ones(size, dtype=bool), np.zeros(size, dtype=bool)


def _read_plan(plan_path: str) -> Optional[Dict]:
    """The checkpoint's plan, or None if plan.json is damaged."""
    try:
        with open(plan_path) as f:
            return json.load(f)
    except DAMAGED_CHECKPOINT:
        return None


def _read_state(state_path: str):
    """The checkpointed (position, counts, alive, absorbed), or None if state.npz is damaged."""
    try:
        with np.load(state_path) as z:
            position = z["position"]
            arrays = tuple(z[name].copy() for name in ("counts", "alive", "absorbed"))
    except DAMAGED_CHECKPOINT:
        return None
    if position.shape != () or not np.issubdtype(position.dtype, np.integer):
        return None
    return (int(position),) + arrays


def _consistent(state, size: int, initial_counts: np.ndarray) -> bool:
    """A checkpoint the merge can continue from: arrays of the store's size and
    kinds, and the counts of the entries still in the store summing to those of
    the source (merging moves counts, never loses them)."""
    position, counts, alive, absorbed = state
    return (
        0 <= position <= size
        and counts.shape == alive.shape == absorbed.shape == (size,)
        and counts.dtype == np.int64 and alive.dtype == absorbed.dtype == np.bool_
        and int(counts[alive].sum()) == int(initial_counts.sum())
        and bool((counts[alive] >= 1).all())
    )


def _save_state(state_dir: str, position: int, counts, alive, absorbed) -> None:
    """One file, replaced atomically: the position and the arrays always agree."""
    path = os.path.join(state_dir, STATE_FILE)
    tmp = path + ".tmp.npz"
    np.savez(tmp, position=np.int64(position), counts=counts, alive=alive, absorbed=absorbed)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune_datastore(
    dstore: str,
    output: str,
    index: Optional[str] = None,
    k: int = 8,
    nprobe: int = 32,
    batch_size: int = 4096,
    overwrite: bool = False,
    checkpoint_every: float = 600.0,
    progress: bool = True,
    log: Callable[[str], None] = _log,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Dict:
    """Prune ``dstore`` into a new datastore at ``output``; returns a summary.

    ``index``: a FAISS index of ``dstore`` (default ``DSTORE/knn.index``),
    checked against it; searches use ``nprobe`` and ``batch_size`` queries
    at a time.  ``on_batch(entries_visited)`` is called after each batch
    (tests raise from it to simulate a crash).
    """
    started = time.monotonic()
    ds = Datastore(str(dstore))
    output = os.path.abspath(str(output).rstrip("/"))
    _check_args(ds, output, int(k), int(nprobe), int(batch_size))
    check_can_write(output, overwrite, what="datastore", option="--output",
                    overwrite_flag="--overwrite", error=PruneError)
    index_path = os.path.abspath(str(index or default_index_path(ds.path)))
    faiss_index, index_meta = load_index(index_path, ds, nprobe=nprobe)

    size = ds.size
    plan = dict(
        format_version=FORMAT_VERSION, source_fingerprint=ds.fingerprint, source_size=size, k=int(k),
        index=index_path, index_created=index_meta.get("created"), nprobe=int(nprobe),
        batch_size=int(batch_size),
    )
    source_counts = None if ds.counts is None else np.asarray(ds.counts, dtype=np.int64)
    initial = np.ones(size, dtype=np.int64) if source_counts is None else source_counts.copy()
    state_dir = output + STATE_SUFFIX
    position, counts, alive, absorbed = _load_state(state_dir, plan, size, initial, log)
    log(f"pruning {size:,} entries of {ds.path} by greedy merging of each entry's {k} nearest "
        f"({index_meta.get('factory')}, nprobe {nprobe}) -> {output}")

    reader = KeyReader(ds.keys)
    merged = int(size - alive.sum())
    last_checkpoint = time.monotonic()
    with tqdm(total=size, initial=position, desc="prune: merge", unit="entries", unit_scale=True,
              disable=not progress, file=sys.stderr) as bar:
        try:
            while position < size:
                lo, hi = position, min(position + batch_size, size)
                visit = np.nonzero(alive[lo:hi])[0]  # entries merged earlier are not searched
                if len(visit):
                    queries = reader.rows(lo, hi)[visit]
                    _, ids = faiss_index.search(queries, int(k) + 1)
                    entry_ids = visit + lo
                    candidates = merge_candidates(entry_ids, ids, ds.vals, int(k))
                    merged += greedy_merge(entry_ids, ids, candidates, counts, alive, absorbed)
                position = hi
                bar.update(hi - lo)
                bar.set_postfix(merged=merged, refresh=False)
                if time.monotonic() - last_checkpoint >= checkpoint_every:
                    _save_state(state_dir, position, counts, alive, absorbed)
                    last_checkpoint = time.monotonic()
                if on_batch is not None:
                    on_batch(position)
        except BaseException:
            # FAISS calls are not interruptible, so the state is consistent here.
            _save_state(state_dir, position, counts, alive, absorbed)
            raise
    _save_state(state_dir, position, counts, alive, absorbed)
    merge_seconds = time.monotonic() - started

    kept = np.nonzero(alive)[0]
    if int(counts[kept].max(initial=1)) > np.iinfo(np.int32).max:
        raise PruneError("an entry would stand for more than 2**31 entries; prune with a smaller --merge-k")
    meta = {key: value for key, value in ds.meta.items() if key not in _REPLACED_META}
    meta.update(
        shard_id=0,
        num_shards=1,
        pruned=dict(
            method="greedy_merge",
            source=ds.path,
            source_fingerprint=ds.fingerprint,
            size_before=size,
            size_after=int(len(kept)),
            entries_represented=int(counts[kept].sum()),
            k=int(k),
            index=index_path,
            index_factory=index_meta.get("factory"),
            nprobe=int(nprobe),
            batch_size=int(batch_size),
            previous=ds.meta.get("pruned"),
            merge_seconds=round(merge_seconds, 3),
        ),
    )
    writer = DatastoreWriter(output, ds.dim, ds.keys.dtype, overwrite=overwrite, with_counts=True)
    try:
        with tqdm(total=len(kept), desc="prune: write", unit="entries", unit_scale=True,
                  disable=not progress, file=sys.stderr) as bar:
            for s in range(0, len(kept), WRITE_CHUNK):
                ids = kept[s : s + WRITE_CHUNK]
                writer.append(np.asarray(ds.keys[ids]), np.asarray(ds.vals[ids]), counts[ids])
                bar.update(len(ids))
        meta["pruned"]["seconds"] = round(time.monotonic() - started, 3)
        writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    shutil.rmtree(state_dir, ignore_errors=True)
    seconds = time.monotonic() - started
    summary = dict(output=output, size_before=size, size_after=int(len(kept)),
                   fraction_kept=round(len(kept) / size, 6), seconds=round(seconds, 3))
    log(f"pruned {size:,} -> {len(kept):,} entries ({len(kept) / size:.2%} kept) in {seconds:.1f} s: "
        f"{output}; build its index with fairseq-knnlm-build-index --dstore {output}")
    return summary
