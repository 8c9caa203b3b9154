"""Indexes built in pieces, for stores too large for one process to build or hold.

FAISS's recipe for stores beyond one machine's RAM: train one empty IVF index
once, add each part of the store to a copy of it in independent jobs, then
either merge the inverted lists into one index whose lists stay on disk
(memory-mapped at search time) or search the pieces where they are.  In an
index directory ``IDX/``:

- ``trained.index``: the empty trained index (``--train-only``);
- ``shard-003-of-008.index``: datastore rows [first_id, first_id + ntotal) of
  shard 3 of 8 added to a copy of it (``--trained ... --shard-id 3
  --num-shards 8``), with their datastore positions as ids, so the pieces'
  ids never collide and a neighbour id indexes ``Datastore.vals`` as in a
  whole index;
- ``knn.index`` + ``knn.ivfdata``: the merge (``--merge IDX``), an ordinary
  index of the whole store for ``--knnlm`` whose inverted lists are the
  ``.ivfdata`` file.

Every piece has a ``.meta.json`` sidecar written last, as a whole index has;
the sidecars carry the trained index's ``trained_id`` and the datastore's
fingerprint, so pieces of different trainings or stores are refused together.
Adding a shard checkpoints and resumes like a whole build; the merge restarts.
"""

import json
import os
import re
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from ..storage.datastore import Datastore
from .build import add_keys, check_at_least, resumable_add, train_index
from .errors import PROG, IndexBuildError, IndexMismatchError
from .factory import MIN_POINTS_PER_CENTROID, default_factory, ivf_of, make_index, nprobe_of, set_nprobe
from .files import (
    FORMAT_VERSION, INDEX_FILE, meta_path, open_datastore, read_flags, read_index_file, remove_files,
    write_index_with_sidecar,
)
from .gpu import check_gpu, to_gpus
from .progress import call_with_clock, log
from .reader import KeyReader
from .recall import evaluate_recall, format_recall
from .search_params import apply_faiss_params

TRAINED_FILE = "trained.index"
IVFDATA_SUFFIX = ".ivfdata"
SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)\.index$")


def shard_index_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:03d}-of-{num_shards:03d}.index"


def shard_span(datastore: Datastore, shard_id: int, num_shards: int) -> Tuple[int, int]:
    """Datastore rows [first, end) of index shard ``shard_id`` of ``num_shards``.

    A datastore written by ``num_shards`` pass shards is split along its own
    shards (each job reads one shard's files); any other store is cut into
    ``num_shards`` contiguous, nearly equal runs.
    """
    if not 0 <= shard_id < num_shards:
        raise IndexBuildError(f"--shard-id must be in [0, {num_shards}), got {shard_id}")
    sizes = [s.size for s in datastore.shards]
    if len(sizes) == num_shards:
        offsets = np.cumsum([0] + sizes)
        return int(offsets[shard_id]), int(offsets[shard_id + 1])
    n = datastore.size
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def _read_sidecar(index_path: str, kind: str, redo: str) -> Dict:
    sidecar = meta_path(index_path)
    if not os.path.isfile(index_path) or not os.path.isfile(sidecar):
        raise IndexBuildError(f"{index_path} is missing or incomplete (no {os.path.basename(sidecar)}); {redo}")
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise IndexBuildError(f"cannot read {sidecar} ({e}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind", "a whole index") if isinstance(meta, dict) else "not an object"
        raise IndexBuildError(f"{index_path} is not a {kind} index ({found}); {redo}")
    missing = [f for f in ("trained_id", "datastore_fingerprint", "dim", "metric", "factory") if f not in meta]
    if missing:
        raise IndexBuildError(f"{sidecar} lacks {', '.join(missing)}; {redo}")
    if os.path.getsize(index_path) != meta.get("index_bytes"):
        raise IndexBuildError(f"{index_path} changed size since it was written (truncated or replaced); {redo}")
    return meta


# ---------------------------------------------------------------- train


def train_only(dstore, output: str, factory: Optional[str] = None, train_size: int = 1_000_000,
               metric: str = "l2", gpu: bool = False, seed: int = 1, overwrite: bool = False,
               nprobe: int = 32, progress: bool = True, log: Callable[[str], None] = log) -> Dict:
    """Train the empty IVF index of a sharded build on a sample of the whole store.

    ``nprobe`` is saved with it, so the pieces added to copies of it search
    with that nprobe unless told otherwise."""
    ds = open_datastore(dstore)
    output = os.path.abspath(str(output))
    _check_piece_output(output, overwrite)
    if gpu:
        check_gpu()
    n_train = min(check_at_least("--train-size", train_size), ds.size)
    check_at_least("--probe", nprobe)
    if factory is None:
        factory, note = default_factory(n_train, ds.dim)
        if note:
            log(note)
    index = make_index(ds.dim, factory, metric)
    ivf = ivf_of(index)
    if ivf is None:
        raise IndexBuildError(
            f"a sharded build needs an IVF index (e.g. IVF4096,PQ64), not {factory}; "
            f"build {factory} whole with {PROG} --dstore {ds.path}"
        )
    if n_train < ivf.nlist:
        raise IndexBuildError(
            f"{factory} has {ivf.nlist} centroids but only {n_train} training keys are available "
            f"(FAISS wants {MIN_POINTS_PER_CENTROID} per centroid); use fewer centroids"
        )
    log(f"training {factory} ({metric}) on {n_train} of {ds.size} keys from {ds.path} -> {output}")
    t0 = time.monotonic()
    train_index(index, KeyReader(ds.keys), factory, n_train, seed, gpu, progress)
    set_nprobe(index, nprobe)
    meta = dict(
        kind="trained", format_version=FORMAT_VERSION, trained_id=uuid.uuid4().hex,
        factory=factory, metric=metric, dim=ds.dim, datastore_fingerprint=ds.fingerprint,
        datastore_size=ds.size, datastore_path=ds.path, keys_dtype=str(ds.keys.dtype),
        train_size=n_train, seed=int(seed), nprobe=int(nprobe), train_seconds=round(time.monotonic() - t0, 3),
        gpu=bool(gpu), faiss_version=faiss.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_index_with_sidecar(index, meta, output, record_bytes=True)
    log(f"wrote {output}; add the shards with {PROG} --dstore {ds.path} --trained {output} "
        "--shard-id I --num-shards N")
    return meta


def _check_piece_output(output: str, overwrite: bool) -> None:
    if os.path.isdir(output):
        raise IndexBuildError(f"--output {output} is a directory; give a file path")
    if os.path.isfile(output) and os.path.exists(meta_path(output)) and not overwrite:
        raise IndexBuildError(f"{output} is already complete; pass --overwrite to rebuild it or choose another --output")
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise IndexBuildError(f"directory {parent} of --output does not exist; create it first")


# ---------------------------------------------------------------- add


def add_shard(dstore, trained: str, shard_id: int, num_shards: int, output: Optional[str] = None,
              add_batch: int = 500_000, gpu: bool = False, overwrite: bool = False,
              checkpoint_every: float = 600.0, progress: bool = True,
              log: Callable[[str], None] = log,
              on_chunk: Optional[Callable[[int], None]] = None) -> Dict:
    """Add datastore shard ``shard_id`` of ``num_shards`` to a copy of the trained index.

    Writes ``shard-XXX-of-YYY.index`` next to the trained index (or ``output``).
    Checkpoints and resumes as a whole build does (``<output>.partial``).
    """
    ds = open_datastore(dstore)
    check_at_least("--num-shards", num_shards)
    check_at_least("--add-batch", add_batch)
    trained = os.path.abspath(str(trained))
    redo = f"train it again with {PROG} --dstore {ds.path} --train-only --output {trained}"
    tmeta = _read_sidecar(trained, "trained", redo)
    if tmeta["datastore_fingerprint"] != ds.fingerprint:
        raise IndexMismatchError(
            f"{trained} was trained for another datastore ({tmeta.get('datastore_path')}); {redo}"
        )
    first, end = shard_span(ds, int(shard_id), int(num_shards))
    output = os.path.abspath(str(output or os.path.join(os.path.dirname(trained),
                                                        shard_index_name(shard_id, num_shards))))
    _check_piece_output(output, overwrite)
    if gpu:
        check_gpu()
    plan = dict(
        format_version=FORMAT_VERSION, kind="shard", trained_id=tmeta["trained_id"],
        factory=tmeta["factory"], metric=tmeta["metric"], dim=ds.dim,
        datastore_fingerprint=ds.fingerprint, datastore_size=end - first,
        shard_id=int(shard_id), num_shards=int(num_shards), first_id=first,
    )
    log(f"index shard {shard_id} of {num_shards}: datastore rows [{first}, {end}) of {ds.path} -> {output}")
    def start():
        index = read_index_file(trained, 0, "rebuild it")
        if index.ntotal:
            raise IndexBuildError(f"{trained} already holds keys; {redo}")
        return index, {}

    index, state, _, checkpoint = resumable_add(output, plan, log, start)
    add_keys(index, KeyReader(ds.keys), add_batch, gpu, progress, checkpoint, checkpoint_every,
              on_chunk, span=(first, end))
    checkpoint(write=False)
    meta = dict(
        plan, ntotal=int(index.ntotal), datastore_size=ds.size, datastore_path=ds.path,
        trained_path=os.path.basename(trained), add_batch=int(add_batch),
        add_seconds=state["add_seconds"], resumed=state["resumed"],
        gpu=bool(gpu), faiss_version=faiss.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_index_with_sidecar(index, meta, output, record_bytes=True)
    log(f"wrote {output} ({index.ntotal} keys)")
    return meta


# ---------------------------------------------------------------- pieces


def find_shards(index_dir: str) -> Tuple[List[str], List[Dict]]:
    """(paths, sidecars) of the complete index shards in ``index_dir``, in order,
    checked to be all shards of one trained index over one datastore, covering
    it once."""
    index_dir = os.path.abspath(str(index_dir))
    if not os.path.isdir(index_dir):
        raise IndexBuildError(f"no index directory at {index_dir}")
    names = sorted(n for n in os.listdir(index_dir) if SHARD_RE.match(n))
    redo = f"add it with {PROG} --dstore DSTORE --trained {os.path.join(index_dir, TRAINED_FILE)} --shard-id I --num-shards N"
    if not names:
        raise IndexBuildError(f"{index_dir} holds no index shards (shard-XXX-of-YYY.index); {redo}")
    paths = [os.path.join(index_dir, n) for n in names]
    metas = [_read_sidecar(p, "shard", redo) for p in paths]
    first = metas[0]
    num_shards = first.get("num_shards")
    for path, meta in zip(paths, metas):
        for field in ("trained_id", "datastore_fingerprint", "num_shards", "dim", "metric"):
            if meta.get(field) != first.get(field):
                raise IndexMismatchError(
                    f"{path} and {paths[0]} disagree on {field}: they are pieces of different "
                    f"builds; rebuild the odd one out from the same trained index ({redo})"
                )
    present = {m["shard_id"] for m in metas}
    missing = sorted(set(range(num_shards)) - present)
    if missing or len(metas) != num_shards:
        raise IndexBuildError(
            f"{index_dir} lacks index shard(s) {', '.join(map(str, missing))} of {num_shards}; {redo}"
        )
    metas.sort(key=lambda m: m["shard_id"])
    paths = [os.path.join(index_dir, shard_index_name(m["shard_id"], num_shards)) for m in metas]
    covered = 0
    for path, meta in zip(paths, metas):
        if meta["first_id"] != covered:
            raise IndexMismatchError(f"{path} starts at datastore row {meta['first_id']}, expected {covered}; {redo}")
        covered += meta["ntotal"]
    if covered != first["datastore_size"]:
        raise IndexMismatchError(f"the shards in {index_dir} cover {covered} of {first['datastore_size']} keys; {redo}")
    return paths, metas


def _check_shards_match(metas: Sequence[Dict], datastore: Datastore, index_dir: str) -> None:
    if metas[0]["datastore_fingerprint"] != datastore.fingerprint or metas[0]["dim"] != datastore.dim:
        raise IndexMismatchError(
            f"the index shards in {index_dir} were built for another datastore "
            f"({metas[0].get('datastore_path')}); rebuild them for {datastore.path}"
        )


# ---------------------------------------------------------------- merge


def merge_shards(index_dir: str, output: Optional[str] = None, overwrite: bool = False,
                 dstore=None, eval_recall: int = 0, nprobe: int = 32, seed: int = 1,
                 progress: bool = True, log: Callable[[str], None] = log) -> Dict:
    """Merge all index shards of ``index_dir`` into one index with on-disk
    inverted lists: ``output`` (default ``IDX/knn.index``) and ``output``
    without ``.index`` + ``.ivfdata``.  Memory: the shards are memory-mapped;
    the merged lists are written straight to the ``.ivfdata`` file.
    """
    index_dir = os.path.abspath(str(index_dir))
    paths, metas = find_shards(index_dir)
    first = metas[0]
    trained = os.path.join(index_dir, TRAINED_FILE)
    tmeta = _read_sidecar(trained, "trained", f"train it with {PROG} --train-only --output {trained}")
    if tmeta["trained_id"] != first["trained_id"]:
        raise IndexMismatchError(
            f"the shards in {index_dir} were added to another trained index than {trained}; "
            "add them again to this one, or restore the trained index they were made from"
        )
    output = os.path.abspath(str(output or os.path.join(index_dir, INDEX_FILE)))
    _check_piece_output(output, overwrite)
    ivfdata = os.path.splitext(output)[0] + IVFDATA_SUFFIX
    index = read_index_file(trained, 0, "rebuild it")
    if isinstance(ivf_of(index), faiss.IndexIVFFastScan):
        raise IndexBuildError(
            f"FAISS cannot keep the lists of a fast-scan index ({first['factory']}) on disk; "
            f"search the shards in place (--knn-index {index_dir}) instead of merging"
        )
    remove_files(meta_path(output), ivfdata + ".partial")
    t0 = time.monotonic()
    call_with_clock(lambda: merge_ondisk(index, paths, ivfdata + ".partial"),
                     f"merge {len(paths)} shards into {os.path.basename(ivfdata)}", progress)
    os.replace(ivfdata + ".partial", ivfdata)  # the open map follows the renamed file
    faiss.downcast_InvertedLists(ivf_of(index).invlists).filename = ivfdata
    set_nprobe(index, nprobe)
    meta = dict(
        {k: tmeta[k] for k in ("factory", "metric", "dim", "datastore_fingerprint", "datastore_size",
                               "datastore_path", "keys_dtype", "train_size", "seed", "train_seconds")},
        format_version=FORMAT_VERSION, ntotal=int(index.ntotal), nprobe=int(nprobe),
        add_seconds=round(sum(m["add_seconds"] for m in metas), 3),
        merged_from=dict(trained_id=first["trained_id"], num_shards=len(paths)),
        merge_seconds=round(time.monotonic() - t0, 3), ondisk=os.path.basename(ivfdata),
        ivfdata_bytes=os.path.getsize(ivfdata),
        faiss_version=faiss.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if eval_recall:
        ds = open_datastore(dstore)
        _check_shards_match(metas, ds, index_dir)
        meta["recall"] = evaluate_recall(index, KeyReader(ds.keys), eval_recall, meta["metric"], seed, progress)
        log(format_recall(meta["recall"]))
    write_index_with_sidecar(index, meta, output)
    log(f"wrote {output} ({index.ntotal} keys; inverted lists in {os.path.basename(ivfdata)})")
    return meta


# ---------------------------------------------------------------- search


def load_index_shards(index_dir: str, datastore, shard_ids: Optional[Sequence[int]] = None,
                      nprobe: Optional[int] = None, faiss_params: Optional[str] = None,
                      mmap: bool = False, gpu: bool = False) -> Tuple[faiss.Index, Dict]:
    """(index, metadata) searching the index shards ``shard_ids`` (default: all)
    of ``index_dir`` in place, as one index.

    Shard ids are datastore positions, so the shards' results merge into those
    of the single index over the whole store (same trained index: the same
    lists are probed and the same codes scored).  Several shards are wrapped in
    one ``faiss.IndexShards`` (``gpu``: one shard per visible GPU, in turn).
    The metadata describes the whole store and gains ``path``, ``shard_ids``,
    ``num_shards`` and ``local_ntotal`` (keys held here).
    """
    ds = open_datastore(datastore)
    paths, metas = find_shards(index_dir)
    _check_shards_match(metas, ds, index_dir)
    num_shards = len(paths)
    shard_ids = list(range(num_shards)) if shard_ids is None else [int(s) for s in shard_ids]
    parts = []
    for s in shard_ids:
        index = read_index_file(paths[s], read_flags(mmap), "rebuild it")
        if index.ntotal != metas[s]["ntotal"]:
            raise IndexBuildError(f"{paths[s]} holds {index.ntotal} keys, its sidecar says {metas[s]['ntotal']}; add it again")
        set_nprobe(index, nprobe)
        apply_faiss_params(index, faiss_params)
        parts.append(index)
    searched_nprobe = nprobe_of(parts[0])  # the pieces' own unless nprobe was given
    if gpu:
        ngpu = check_gpu()
        parts = [to_gpus(p, devices=[i % ngpu]) for i, p in enumerate(parts)]
    if len(parts) == 1:
        index = parts[0]
    else:
        # One piece after the other on CPUs, each with all of FAISS's OpenMP threads
        # (IVF-PQ scores can differ in the last bit with the thread count, so this
        # keeps --knn-faiss-threads in charge); GPU pieces are searched in parallel.
        # successive_ids off: the pieces' ids are already datastore positions.
        index = faiss.IndexShards(ds.dim, bool(gpu), False)
        for p in parts:
            index.add_shard(p)
        index.referenced_objects = parts  # the wrapper does not own its shards
    first = metas[0]
    meta = dict(
        {k: first[k] for k in ("factory", "metric", "dim", "datastore_fingerprint", "trained_id")},
        ntotal=ds.size, datastore_size=ds.size, path=os.path.abspath(str(index_dir)),
        num_shards=num_shards, shard_ids=shard_ids, local_ntotal=int(sum(p.ntotal for p in parts)),
        nprobe=searched_nprobe,
    )
    return index, meta
