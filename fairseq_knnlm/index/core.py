"""The FAISS index over a datastore's keys: build (resumably), check, load.

An index lives next to the datastore by default (``DSTORE/knn.index``) with a
sidecar ``knn.index.meta.json`` naming the datastore it was built for.  The
sidecar is written last: an index without one is incomplete.  While keys are
being added, ``<index>.partial`` (the index so far) and
``<index>.partial.json`` (the settings it was built with) are checkpointed so
that an interrupted build continues where it stopped.

Ids in the index are datastore positions (keys are added in order, and FAISS
numbers them sequentially), so a neighbour id indexes ``Datastore.vals``.
"""

import json
import mmap
import os
import sys
import threading
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from faiss.contrib.ivf_tools import replace_ivf_quantizer
from tqdm import tqdm

from ..storage.datastore import Datastore, RowConcat, write_json_atomic
from ..errors import UserError
from .search_params import apply_faiss_params
from ..storage.validate import (
    COUNT, NAMED_ENTRIES, POSITIVE, check_fields, nonfinite_keys_message, nonfinite_rows, read_json_object,
)

FORMAT_VERSION = 1
INDEX_FILE = "knn.index"
META_SUFFIX = ".meta.json"
PARTIAL_SUFFIX = ".partial"
PROG = "fairseq-knnlm-build-index"
# Sidecar fields that readers rely on (the builder and the import write more).
INDEX_META_FIELDS = dict(datastore_fingerprint=str, ntotal=COUNT, dim=POSITIVE, metric=("l2", "ip"))

# The paper's index: 4096 centroids, 64-byte PQ codes with 8-bit sub-quantizers.
DEFAULT_NLIST = 4096
DEFAULT_PQ_BYTES = 64
PQ_CENTROIDS = 256
# FAISS warns when k-means gets fewer than 39 training points per centroid.
MIN_POINTS_PER_CENTROID = 39
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
# recall@1024: kNN-LM's k (only for stores of at least that many keys).
RECALL_KS = (1, 10, 100, 1024)
# Neighbour-key floats read at once while scoring --eval-recall's results.
RECALL_BLOCK_FLOATS = 1 << 22
# Bytes of key pages resident at once while reading scattered keys, and rows
# per block of exact search for --eval-recall.
GATHER_BYTES = 64 << 20
EXACT_SEARCH_BLOCK = 1 << 16


class IndexBuildError(UserError):
    """An index cannot be built or used as asked; the message says what to do."""


class IndexMismatchError(IndexBuildError):
    """An index that was not built for the datastore it is used with."""


def default_index_path(dstore_dir: str) -> str:
    return os.path.join(str(dstore_dir), INDEX_FILE)


def meta_path(index_path: str) -> str:
    return str(index_path) + META_SUFFIX


def partial_paths(index_path: str) -> Tuple[str, str]:
    """(checkpointed index, its build settings) of an unfinished build."""
    partial = str(index_path) + PARTIAL_SUFFIX
    return partial, partial + ".json"


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _faiss_message(error: Exception) -> str:
    """The useful part of a FAISS C++ exception (drops the source location)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    for marker in ("failed: ", "Error: "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return text.strip()


# ---------------------------------------------------------------- factory


def default_factory(n_train: int, dim: int) -> Tuple[str, Optional[str]]:
    """The paper's ``IVF4096,PQ64``, scaled down to what ``n_train`` keys can train.

    Returns (factory, note); note says what was adapted and why, or is None.
    """
    paper = f"IVF{DEFAULT_NLIST},PQ{DEFAULT_PQ_BYTES}"
    if n_train < MIN_POINTS_PER_CENTROID * PQ_CENTROIDS:
        # Too few keys to train 256 PQ centroids; exact search is cheap anyway.
        return "Flat", (
            f"{n_train} training keys are too few for {paper} (FAISS wants "
            f"{MIN_POINTS_PER_CENTROID} per centroid); using exact search (Flat)"
        )
    notes = []
    nlist = DEFAULT_NLIST
    while nlist > PQ_CENTROIDS and n_train < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    if nlist != DEFAULT_NLIST:
        notes.append(
            f"{nlist} centroids instead of {DEFAULT_NLIST}: {n_train} training keys "
            f"(FAISS wants {MIN_POINTS_PER_CENTROID} per centroid)"
        )
    # PQ splits the key into equal sub-vectors: the code size must divide dim.
    m = max(d for d in range(1, min(DEFAULT_PQ_BYTES, dim) + 1) if dim % d == 0)
    if m != DEFAULT_PQ_BYTES:
        notes.append(f"PQ{m} instead of PQ{DEFAULT_PQ_BYTES}: the code size must divide dim {dim}")
    factory = f"IVF{nlist},PQ{m}"
    return factory, (f"using {factory}: " + "; ".join(notes)) if notes else None


def make_index(dim: int, factory: str, metric: str) -> faiss.Index:
    """``faiss.index_factory``, with FAISS's refusal turned into a one-line error.

    PQ codes skip polysemous training, as in the paper's ``IndexIVFPQ``: the
    factory turns it on, but it only reorders codes for polysemous (Hamming)
    filtering, which kNN-LM does not use; search results are the same and it
    costs seconds per sub-quantizer, most of the training time.
    """
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        raise IndexBuildError(
            f"FAISS rejects --index-factory {factory!r} for {dim}-dim keys "
            f"({_faiss_message(e)}); see the FAISS wiki page 'The index factory'"
        ) from None
    for part in _layers(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    return index


def _layers(index: faiss.Index) -> Iterator[faiss.Index]:
    """``index`` and the indexes it wraps: pre-transforms (OPQ, PCA), refine, ID maps."""
    index = faiss.downcast_index(index)
    yield index
    for name in ("index", "base_index"):
        inner = getattr(index, name, None)
        if isinstance(inner, faiss.Index):
            yield from _layers(inner)
            return


def _ivf(index: faiss.Index):
    """The IVF part of an index (inside pre-transforms), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def set_nprobe(index: faiss.Index, nprobe: Optional[int]) -> None:
    ivf = _ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(nprobe)


# ---------------------------------------------------------------- key reads


class KeyReader:
    """Rows of ``Datastore.keys`` as float32, without keeping file pages resident.

    Pages read through a memory map count towards the process's RSS until they
    are unmapped, so streaming a whole store through one long-lived map would
    grow RSS with the store.  This reader maps the key files itself and drops
    the pages it read (``MADV_DONTNEED``; the OS page cache keeps them) after
    each read, so its footprint is one chunk or one gather batch.

    Every read is checked for NaN and inf (IndexBuildError naming the entries):
    FAISS would index them silently.
    """

    def __init__(self, keys):
        self._parts = []  # (rows, mmap or None, byte offset of row 0 in the map)
        parts = keys.parts if isinstance(keys, RowConcat) else [keys]
        self._files = [getattr(part, "filename", None) for part in parts]  # named in refusals
        self._float16 = np.dtype(keys.dtype) == np.float16
        for part in keys.parts if isinstance(keys, RowConcat) else [keys]:
            if isinstance(part, np.memmap) and part.filename:
                with open(part.filename, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                rows = np.frombuffer(mm, part.dtype, part.size, part.offset).reshape(part.shape)
                self._parts.append((rows, mm, part.offset))
            else:
                self._parts.append((np.asarray(part), None, 0))
        self.offsets = np.cumsum([0] + [len(rows) for rows, _, _ in self._parts])
        self.size = int(self.offsets[-1])
        self.dim = int(keys.shape[1])
        row_bytes = self.dim * np.dtype(keys.dtype).itemsize
        # Scattered reads touch up to a page per row: bound the pages per batch.
        self.gather_batch = max(1, GATHER_BYTES // (row_bytes + mmap.PAGESIZE))

    def _release(self, p: int, lo: int, hi: int) -> None:
        """Drop the pages of rows [lo, hi) of part ``p`` from this process."""
        rows, mm, offset = self._parts[p]
        if mm is None or hi <= lo or not hasattr(mm, "madvise"):
            return
        start = offset + lo * rows.strides[0]
        start -= start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, offset + hi * rows.strides[0] - start)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Keys [lo, hi) as a new float32 array."""
        out = np.empty((hi - lo, self.dim), np.float32)
        for p, (rows, _, _) in enumerate(self._parts):
            start = self.offsets[p]
            a, b = max(lo - start, 0), min(hi - start, len(rows))
            if a < b:
                out[start + a - lo : start + b - lo] = rows[a:b]
                self._release(p, a, b)
        self._check_finite(out, lambda rows: rows + lo)
        return out

    def chunks(self, batch: int, start: int = 0, end: Optional[int] = None) -> Iterator[Tuple[int, int, np.ndarray]]:
        end = self.size if end is None else end
        for lo in range(start, end, batch):
            hi = min(lo + batch, end)
            yield lo, hi, self.rows(lo, hi)

    def take(self, ids: np.ndarray, bar: Optional[tqdm] = None) -> np.ndarray:
        """Keys at ``ids`` (any order) as a new float32 array."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((len(ids), self.dim), np.float32)
        for b in range(0, len(ids), self.gather_batch):
            sel = order[b : b + self.gather_batch]
            batch = ids[sel]
            which = np.searchsorted(self.offsets, batch, side="right") - 1
            for p, (rows, _, _) in enumerate(self._parts):
                mask = which == p
                if mask.any():
                    local = batch[mask] - self.offsets[p]
                    out[sel[mask]] = rows[local]
                    self._release(p, local[0], local[-1] + 1)
            if bar is not None:
                bar.update(len(sel))
        self._check_finite(out, lambda rows: ids[rows])
        return out

    def _check_finite(self, out: np.ndarray, positions: Callable[[np.ndarray], np.ndarray]) -> None:
        """IndexBuildError if rows of ``out`` hold NaN or inf; ``positions`` maps
        rows of ``out`` to datastore positions."""
        bad = nonfinite_rows(out)
        if not len(bad):
            return
        entries = np.sort(positions(bad))
        part = int(np.searchsorted(self.offsets, entries[0], side="right") - 1)
        overflow = self._float16 and bool(np.isinf(out[bad]).any())
        local = entries[entries < self.offsets[part + 1]] - self.offsets[part]  # rows of that file
        raise IndexBuildError(nonfinite_keys_message(
            self._files[part] or "the datastore's keys", local[:NAMED_ENTRIES], len(bad),
            f"of the {len(out):,} keys read", overflow, "FAISS cannot index them: rebuild the datastore"))


# ---------------------------------------------------------------- GPU


def _check_gpu() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        raise IndexBuildError(
            "this faiss has no GPU support; install a GPU build (FAISS=gpu bash "
            "scripts/install.sh, i.e. faiss-gpu-cu12) or drop --gpu"
        )
    ngpu = faiss.get_num_gpus()
    if ngpu < 1:
        raise IndexBuildError("faiss sees no GPU (check CUDA_VISIBLE_DEVICES) ; drop --gpu")
    return ngpu


def _to_gpus(index: faiss.Index, shard: bool = False) -> faiss.Index:
    """A copy of ``index`` on all visible GPUs (``shard``: split, not replicated)."""
    co = faiss.GpuMultipleClonerOptions()
    # GPU IVF-PQ needs float16 lookup tables for large codes; for flat
    # storage the option would round the vectors, so it stays off there.
    co.useFloat16 = isinstance(_ivf(index), faiss.IndexIVFPQ)
    co.shard = shard
    try:
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except RuntimeError as e:
        raise IndexBuildError(
            f"FAISS cannot put this index on GPUs ({_faiss_message(e)}); use it on the CPU"
        ) from None


def _gpu_flat(ivf) -> faiss.Index:
    """An exact flat index of the IVF's metric and dimension on all GPUs."""
    return _to_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))


class _GpuAssign:
    """Runs the coarse assignment of ``index.add`` on GPUs, keeping a CPU index.

    The GPU quantizer is swapped in around each ``add`` call only, so the index
    can be checkpointed (written) at any point between calls.
    """

    def __init__(self, index: faiss.Index):
        self.index = index
        self.ivf = _ivf(index)
        self.gpu_quantizer = None
        if self.ivf is not None:
            self.gpu_quantizer = _gpu_flat(self.ivf)
            self.gpu_quantizer.add(self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist))

    def add(self, x: np.ndarray, ids: Optional[np.ndarray] = None) -> None:
        if self.gpu_quantizer is None:
            _add(self.index, x, ids)
            return
        cpu_quantizer = replace_ivf_quantizer(self.ivf, self.gpu_quantizer)
        try:
            _add(self.index, x, ids)
        finally:
            replace_ivf_quantizer(self.ivf, cpu_quantizer)


def _add(index: faiss.Index, x: np.ndarray, ids: Optional[np.ndarray]) -> None:
    if ids is None:
        index.add(x)
    else:
        index.add_with_ids(x, ids)


# ---------------------------------------------------------------- files


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index_atomic(index: faiss.Index, path: str) -> None:
    tmp = path + ".tmp"
    faiss.write_index(index, tmp)
    _fsync(tmp)
    os.replace(tmp, path)



def _remove(*paths: str) -> None:
    for path in paths:
        for p in (path, path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)


def read_index_meta(index_path: str) -> Dict:
    """The sidecar metadata of a complete index; IndexBuildError if it is missing."""
    index_path = str(index_path)
    build = f"{PROG} --dstore DSTORE_DIR --output {index_path}"
    if not os.path.isfile(index_path):
        raise IndexBuildError(f"no index at {index_path}; build it with {build}")
    if not os.path.exists(meta_path(index_path)):
        raise IndexBuildError(
            f"index {index_path} is incomplete (no {os.path.basename(meta_path(index_path))}); "
            f"rebuild it with {build}"
        )
    meta = read_json_object(meta_path(index_path), IndexBuildError, f"rebuild the index with {build} --overwrite")
    check_fields(meta, INDEX_META_FIELDS, meta_path(index_path), IndexBuildError,
                 f"rebuild the index with {build} --overwrite")
    return meta


def check_index_matches(meta: Dict, datastore: Datastore, index_path: str) -> None:
    """IndexMismatchError unless ``meta`` describes an index of exactly this datastore."""
    rebuild = f"rebuild it with {PROG} --dstore {datastore.path} --output {index_path} --overwrite"
    if meta.get("datastore_fingerprint") != datastore.fingerprint:
        built_for = meta.get("datastore_path")
        other = "an earlier build of this datastore" if built_for == datastore.path else built_for
        raise IndexMismatchError(
            f"index {index_path} was built for another datastore ({other}); {rebuild}"
        )
    if meta.get("ntotal") != datastore.size or meta.get("dim") != datastore.dim:
        raise IndexMismatchError(
            f"index {index_path} holds {meta.get('ntotal')} keys of dim {meta.get('dim')} but "
            f"datastore {datastore.path} has {datastore.size} of dim {datastore.dim}; {rebuild}"
        )


def _open_datastore(dstore) -> Datastore:
    return dstore if isinstance(dstore, Datastore) else Datastore(str(dstore))


def read_flags(mmap: bool = False) -> int:
    """faiss.read_index flags: on-disk inverted lists (a merged sharded build)
    are found next to the index file wherever it was moved; ``mmap``
    (``--knn-index-mmap``) maps an IVF's inverted lists instead of reading
    them into RAM.  Either way search results are the same."""
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    if mmap:
        flags |= faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    return flags


def check_ondisk_data(index_path: str, meta: Dict) -> None:
    """The ``.ivfdata`` file of a merged index is the one the merge wrote."""
    if not meta.get("ondisk"):
        return
    data = os.path.join(os.path.dirname(index_path), meta["ondisk"])
    if not os.path.isfile(data) or os.path.getsize(data) != meta.get("ivfdata_bytes"):
        raise IndexBuildError(
            f"the inverted lists of {index_path} ({data}) are missing or changed size; keep the "
            f"two files together, or merge again with {PROG} --merge {os.path.dirname(index_path)} --overwrite"
        )


def _read_checked(index_path: str, flags: int, meta: Dict, ds: Datastore) -> faiss.Index:
    """``faiss.read_index``, with a damaged file (cut short, corrupted) or one whose
    header disagrees with its sidecar turned into a one-line error."""
    rebuild = f"rebuild it with {PROG} --dstore {ds.path} --output {index_path} --overwrite"
    try:
        index = faiss.read_index(index_path, flags)
    except (RuntimeError, MemoryError) as e:
        raise IndexBuildError(
            f"FAISS cannot read index {index_path} ({_faiss_message(e)}): the file is truncated or damaged; "
            f"{rebuild}") from None
    metric = {faiss.METRIC_L2: "l2", faiss.METRIC_INNER_PRODUCT: "ip"}.get(index.metric_type)
    if index.d != meta["dim"] or metric != meta["metric"]:
        raise IndexMismatchError(
            f"index {index_path} holds {index.d}-dim keys with metric {metric or index.metric_type}, its "
            f"metadata says {meta['dim']}-dim {meta['metric']}: the file is damaged or was replaced; {rebuild}")
    return index


def load_index(
    index_path: str, datastore, nprobe: Optional[int] = None, gpu: bool = False,
    faiss_params: Optional[str] = None, mmap: bool = False,
) -> Tuple[faiss.Index, Dict]:
    """(index, metadata) of a complete index checked against ``datastore``.

    Sets ``nprobe`` on the IVF (inside any wrapper) and ``faiss_params``
    (``--knn-faiss-params``, FAISS ParameterSpace syntax); ``gpu`` then copies
    the index to all visible GPUs (sharded).  ``mmap``: see :func:`read_flags`.
    The metadata gains ``path``.
    """
    ds = _open_datastore(datastore)
    index_path = os.path.abspath(str(index_path))
    meta = read_index_meta(index_path)
    check_index_matches(meta, ds, index_path)
    if "index_bytes" in meta and os.path.getsize(index_path) != meta["index_bytes"]:
        raise IndexMismatchError(
            f"index {index_path} ({meta.get('adopted_from')}) changed since it was adopted; "
            "rerun fairseq-knnlm-import with --indexfile"
        )
    check_ondisk_data(index_path, meta)
    index = _read_checked(index_path, read_flags(mmap), meta, ds)
    if index.ntotal != ds.size:
        raise IndexMismatchError(
            f"index {index_path} holds {index.ntotal} keys, its metadata and datastore "
            f"{ds.path} say {ds.size}; rebuild it with {PROG} --dstore {ds.path} --overwrite"
        )
    set_nprobe(index, nprobe)
    apply_faiss_params(index, faiss_params)
    if gpu:
        _check_gpu()
        index = _to_gpus(index, shard=True)
    return index, dict(meta, path=index_path)


# ---------------------------------------------------------------- build


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if int(value) < minimum:
        raise IndexBuildError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _check_output(output: str, datastore: Datastore, overwrite: bool) -> None:
    """Refuse, before any work, to replace a complete index or write where we can't."""
    if os.path.isdir(output):
        raise IndexBuildError(f"--output {output} is a directory; give a file path")
    if os.path.isfile(output) and os.path.exists(meta_path(output)) and not overwrite:
        try:
            check_index_matches(read_index_meta(output), datastore, output)
            why = "already holds a complete index of this datastore"
        except IndexMismatchError:
            why = "holds an index of another datastore"
        except ValueError:  # unreadable or incomplete sidecar
            why = "holds an index whose metadata cannot be read"
        raise IndexBuildError(
            f"{output} {why}; pass --overwrite to rebuild it or choose another --output"
        )
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise IndexBuildError(f"directory {parent} of --output does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IndexBuildError(f"cannot write to {parent}; choose a writable --output")


def _sample_ids(size: int, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(size, n, replace=False))


def _call_with_clock(fn: Callable, desc: str, progress: bool):
    """Run a long FAISS call (which releases the GIL) under a ticking tqdm clock."""
    if not progress:
        return fn()
    result = {}
    threads = faiss.omp_get_max_threads()  # OpenMP settings are per thread

    def target():
        try:
            faiss.omp_set_num_threads(threads)
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr) as clock:
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            clock.refresh()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _train(index, reader: KeyReader, factory: str, n_train: int, seed: int,
           gpu: bool, progress: bool) -> None:
    ids = _sample_ids(reader.size, n_train, seed)
    with tqdm(total=n_train, desc="train: read sample", unit="keys", unit_scale=True,
              disable=not progress, file=sys.stderr) as bar:
        x = reader.take(ids, bar)
    ivf = _ivf(index)
    if gpu and ivf is not None:
        # k-means, the bulk of training, on all GPUs (the FAISS benchmarks' recipe);
        # the local keeps the GPU index alive while FAISS points at it.
        clustering_index = _gpu_flat(ivf)
        ivf.clustering_index = clustering_index
    try:
        _call_with_clock(lambda: index.train(x), f"train: fit {factory} on {n_train} keys", progress)
    except RuntimeError as e:
        raise IndexBuildError(
            f"training {factory} on {n_train} keys failed ({_faiss_message(e)}); "
            "use a larger --train-size or a smaller index (fewer centroids)"
        ) from None
    finally:
        if ivf is not None:
            ivf.clustering_index = None


def _resume(output: str, plan: Dict, log) -> Optional[Tuple[faiss.Index, Dict]]:
    """The checkpointed index and state of an unfinished build with the same plan."""
    part_index, part_state = partial_paths(output)
    if not (os.path.exists(part_index) and os.path.exists(part_state)):
        _remove(part_index, part_state)
        return None
    try:
        with open(part_state) as f:
            state = json.load(f)
        numbers = ("add_seconds", "resumed") + (("train_seconds",) if "train_size" in plan else ())
        if not isinstance(state, dict) or not all(isinstance(state.get(k), (int, float)) for k in numbers):
            raise ValueError("not a build state")
        changed = sorted(k for k, v in plan.items() if state.get(k) != v)
        index = None if changed else faiss.read_index(part_index)
        if index is not None and (index.d != plan.get("dim", index.d) or not index.is_trained):
            raise ValueError("not the planned index")
    except (OSError, ValueError, RuntimeError, MemoryError):  # a damaged checkpoint is only lost time
        changed, index = ["unreadable checkpoint"], None
    if changed or index.ntotal > plan["datastore_size"]:
        log(f"discarding the unfinished build at {part_index} (changed: {', '.join(changed)})")
        _remove(part_index, part_state)
        return None
    log(f"resuming the build at {part_index}: {index.ntotal} of {plan['datastore_size']} keys already added")
    return index, state


def resumable_add(output: str, plan: Dict, log, start: Callable[[], Tuple[faiss.Index, Dict]]):
    """(index, state, resumed, checkpoint) of a stage that adds keys to ``output``.

    The checkpoint at ``<output>.partial`` when its plan matches ``plan``,
    else ``start()`` -> (index, extra state fields).  ``checkpoint()`` saves
    the index and state with the add time so far; ``checkpoint(write=False)``
    only updates ``state["add_seconds"]``.
    """
    part_index, part_state = partial_paths(output)
    resumed = _resume(output, plan, log)
    if resumed:
        index, state = resumed
        state["resumed"] = state.get("resumed", 0) + 1
    else:
        index, extra = start()
        state = dict(plan, **extra, add_seconds=0.0, resumed=0)
    started, before = time.monotonic(), state["add_seconds"]

    def checkpoint(write: bool = True):
        state["add_seconds"] = round(before + time.monotonic() - started, 3)
        if write:
            _write_index_atomic(index, part_index)
            write_json_atomic(part_state, state)

    return index, state, resumed is not None, checkpoint


def _add_keys(index, reader: KeyReader, add_batch: int, gpu: bool, progress: bool,
              checkpoint: Callable[[], None], checkpoint_every: float,
              on_chunk: Optional[Callable[[int], None]], span: Optional[Tuple[int, int]] = None) -> None:
    """Add the keys not yet in ``index``: all of the store, or the rows
    ``span`` = (first, end) of it with their positions as explicit ids (a
    shard of a sharded build)."""
    add = _GpuAssign(index).add if gpu else (lambda x, ids=None: _add(index, x, ids))
    first, end = span if span is not None else (0, reader.size)
    last_checkpoint = time.monotonic()
    with tqdm(total=end - first, initial=index.ntotal, desc="add", unit="keys", unit_scale=True,
              disable=not progress, file=sys.stderr) as bar:
        try:
            for lo, hi, x in reader.chunks(add_batch, start=first + index.ntotal, end=end):
                # Ids are datastore positions: FAISS numbers added vectors ntotal,
                # ntotal+1, ... in a whole build; a shard passes them explicitly.
                assert first + index.ntotal == lo
                add(x, None if span is None else np.arange(lo, hi, dtype=np.int64))
                del x
                bar.update(hi - lo)
                if hi < end and time.monotonic() - last_checkpoint >= checkpoint_every:
                    checkpoint()
                    last_checkpoint = time.monotonic()
                if on_chunk is not None:
                    on_chunk(hi)
        except KeyboardInterrupt:
            # FAISS calls are not interruptible, so the index is consistent here.
            checkpoint()
            raise


def build_index(
    dstore,
    output: Optional[str] = None,
    factory: Optional[str] = None,
    train_size: int = 1_000_000,
    add_batch: int = 500_000,
    metric: str = "l2",
    gpu: bool = False,
    seed: int = 1,
    eval_recall: int = 0,
    nprobe: int = 32,
    overwrite: bool = False,
    checkpoint_every: float = 600.0,
    progress: bool = True,
    log: Callable[[str], None] = _log,
    on_chunk: Optional[Callable[[int], None]] = None,
) -> Dict:
    """Build the index of a datastore and return its metadata.

    ``factory`` None means the paper's IVF4096,PQ64 adapted to the store's size.
    ``train_size`` larger than the store is clamped (with a message).  Adding
    checkpoints to ``<output>.partial`` every ``checkpoint_every`` seconds and
    on Ctrl-C; a rerun with the same settings resumes from there.
    ``on_chunk(keys_added)`` is called after each added chunk (tests raise from
    it to simulate a crash).
    """
    ds = _open_datastore(dstore)
    if ds.size == 0:
        raise IndexBuildError(f"datastore {ds.path} is empty; rebuild it on some text")
    if metric not in METRICS:
        raise IndexBuildError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    _positive("--train-size", train_size)
    _positive("--add-batch", add_batch)
    _positive("--eval-recall", eval_recall, minimum=0)
    _positive("--nprobe", nprobe)
    output = os.path.abspath(str(output or default_index_path(ds.path)))
    _check_output(output, ds, overwrite)
    if gpu:
        _check_gpu()

    n_train = int(train_size)
    if n_train > ds.size:
        log(f"--train-size {train_size} exceeds the datastore's {ds.size} keys; training on all of them")
        n_train = ds.size
    if factory is None:
        factory, note = default_factory(n_train, ds.dim)
        if note:
            log(note)
    index = make_index(ds.dim, factory, metric)
    if index.is_trained:
        n_train = 0  # e.g. Flat: nothing to train
    nlist = _ivf(index).nlist if _ivf(index) is not None else 0
    if n_train < nlist:
        raise IndexBuildError(
            f"{factory} has {nlist} centroids but only {n_train} training keys are available "
            f"(FAISS wants {MIN_POINTS_PER_CENTROID} per centroid); use fewer centroids"
        )

    plan = dict(
        format_version=FORMAT_VERSION, factory=factory, metric=metric, dim=ds.dim,
        datastore_fingerprint=ds.fingerprint, datastore_size=ds.size,
        train_size=n_train, seed=int(seed),
    )
    log(f"index {factory} ({metric}) of {ds.size} keys x {ds.dim} from {ds.path} -> {output}")
    reader = KeyReader(ds.keys)

    def start():
        t0 = time.monotonic()
        if n_train:
            _train(index, reader, factory, n_train, seed, gpu, progress)
        return index, dict(train_seconds=round(time.monotonic() - t0, 3))

    index, state, resumed, checkpoint = resumable_add(output, plan, log, start)
    if not resumed:
        checkpoint()  # training can take hours: never redo it
    _add_keys(index, reader, add_batch, gpu, progress, checkpoint, checkpoint_every, on_chunk)
    checkpoint(write=False)

    set_nprobe(index, nprobe)  # saved with the index, used by --eval-recall
    meta = dict(
        plan,
        ntotal=int(index.ntotal),
        datastore_path=ds.path,
        keys_dtype=str(ds.keys.dtype),
        add_batch=int(add_batch),
        nprobe=int(nprobe) if _ivf(index) is not None else None,
        train_seconds=state["train_seconds"],
        add_seconds=state["add_seconds"],
        resumed=state["resumed"],
        gpu=bool(gpu),
        faiss_version=faiss.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if eval_recall:
        t0 = time.monotonic()
        meta["recall"] = evaluate_recall(index, reader, eval_recall, metric, seed, progress)
        meta["recall"]["seconds"] = round(time.monotonic() - t0, 3)
        log(format_recall(meta["recall"]))
    _finish(index, meta, output)
    log(f"wrote {output} ({index.ntotal} keys) and {os.path.basename(meta_path(output))}")
    return meta


def _finish(index: faiss.Index, meta: Dict, output: str) -> None:
    """Index into place atomically, then the sidecar (last: it marks completion)."""
    part_index, part_state = partial_paths(output)
    _remove(meta_path(output))  # an old sidecar must never vouch for the new index
    _write_index_atomic(index, output)
    write_json_atomic(meta_path(output), meta)
    _remove(part_index, part_state)


# ---------------------------------------------------------------- recall


def _exact_scores(queries: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """(n, k) exact L2 distances (lower is better) or inner products, in float64."""
    q = queries[:, None, :].astype(np.float64)
    if metric == "l2":
        return ((keys.astype(np.float64) - q) ** 2).sum(-1)
    return (keys.astype(np.float64) * q).sum(-1)


def evaluate_recall(index: faiss.Index, reader: KeyReader, n_queries: int, metric: str,
                    seed: int = 1, progress: bool = False, ks=RECALL_KS) -> Dict:
    """recall@k of ``index`` against exact search, stored keys as queries.

    recall@k is the fraction of the exact k nearest keys that the index
    returns in its top k.  A returned key tied with the exact k-th distance
    counts as found (stores can hold duplicate keys, whose order is arbitrary).
    """
    n = min(int(n_queries), reader.size)
    ks = [k for k in ks if k <= reader.size]
    kmax = max(ks)
    ids = np.random.default_rng([seed, 1]).choice(reader.size, n, replace=False)
    xq = reader.take(ids)
    blocks = (x for _, _, x in reader.chunks(EXACT_SEARCH_BLOCK))
    _, true_ids = _call_with_clock(
        lambda: knn_ground_truth(xq, blocks, kmax, metric_type=METRICS[metric]),
        f"recall: exact search for {n} queries", progress)
    _, found_ids = index.search(xq, kmax)
    hits = {k: 0 for k in ks}
    better = np.less_equal if metric == "l2" else np.greater_equal
    rows = max(1, min(64, RECALL_BLOCK_FLOATS // (kmax * reader.dim)))  # bounded memory at k 1024
    for b in range(0, n, rows):
        q = xq[b : b + rows]
        t, f = true_ids[b : b + rows], found_ids[b : b + rows]
        true_s = _exact_scores(q, reader.take(t.reshape(-1)).reshape(t.shape + (-1,)), metric)
        found_s = _exact_scores(q, reader.take(np.maximum(f, 0).reshape(-1)).reshape(f.shape + (-1,)), metric)
        true_s = np.sort(true_s, axis=1) if metric == "l2" else -np.sort(-true_s, axis=1)
        for k in ks:
            kth = true_s[:, k - 1 : k]
            ok = better(found_s[:, :k], kth) & (f[:, :k] >= 0)
            hits[k] += int(ok.sum())
    ivf = _ivf(index)
    return dict(queries=n, nprobe=ivf.nprobe if ivf is not None else None,
                **{f"recall@{k}": round(hits[k] / (n * k), 4) for k in ks})


def format_recall(recall: Dict) -> str:
    values = " ".join(f"{k} {v:.4f}" for k, v in recall.items() if k.startswith("recall@"))
    probe = f", nprobe {recall['nprobe']}" if recall.get("nprobe") else ""
    return f"{values} ({recall['queries']} stored keys as queries{probe})"


# ---------------------------------------------------------------- adopt

METRIC_NAMES = {v: k for k, v in METRICS.items()}


def describe_index(index: faiss.Index) -> str:
    """An index_factory-style name of an index read from disk, e.g. IVF4096,PQ64."""
    ivf = _ivf(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        nbits = f"x{ivf.pq.nbits}" if ivf.pq.nbits != 8 else ""
        return f"IVF{ivf.nlist},PQ{ivf.pq.M}{nbits}"
    if ivf is not None:
        return f"IVF{ivf.nlist},{type(ivf).__name__}"
    return type(index).__name__  # read_index returns the concrete class


def read_foreign_index(path: str, size: int, dim: int) -> Tuple[faiss.Index, str]:
    """(index, metric) of an index made elsewhere (e.g. by the original kNN-LM
    code), checked to hold ``size`` keys of ``dim``.  Inverted lists are
    memory-mapped, not loaded: checking a 100M-key index needs little RAM."""
    path = os.path.abspath(str(path))
    if not os.path.isfile(path):
        raise IndexBuildError(f"no index at {path}; check --indexfile")
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise IndexBuildError(f"FAISS cannot read {path} ({_faiss_message(e)}); check --indexfile") from None
    metric = METRIC_NAMES.get(index.metric_type)
    if metric is None:
        raise IndexBuildError(
            f"index {path} uses FAISS metric {index.metric_type}; kNN-LM needs an L2 or inner-product index"
        )
    if index.d != dim or index.ntotal != size:
        raise IndexMismatchError(
            f"index {path} holds {index.ntotal} keys of dim {index.d} but the datastore has "
            f"{size} of dim {dim}: it is an index of another store; give its own --indexfile "
            "or leave it out and build one with " + PROG
        )
    return index, metric


def self_recall(index: faiss.Index, keys, queries: int = 1000, k: int = 1024,
                nprobe: Optional[int] = 32, seed: int = 1, progress: bool = False) -> Dict:
    """Stored keys searched in ``index``: the fraction that find their own
    position among their ``k`` nearest ids (``at_k``) and at rank 1 (``at_1``).

    An index over other keys, or whose ids are not the store's positions,
    scores near 0; an index of this store near 1 (only quantisation error can
    push a key below others).
    """
    reader = KeyReader(keys)
    n, k = min(int(queries), reader.size), min(int(k), reader.size)
    ids = _sample_ids(reader.size, n, seed)
    xq = reader.take(ids)
    set_nprobe(index, nprobe)
    found = np.empty((n, k), np.int64)
    with tqdm(total=n, desc="self-recall", unit="queries", disable=not progress, file=sys.stderr) as bar:
        for b in range(0, n, 100):
            _, found[b : b + 100] = index.search(xq[b : b + 100], k)
            bar.update(min(100, n - b))
    hit = found == ids[:, None]
    ivf = _ivf(index)
    return dict(queries=n, k=k, nprobe=ivf.nprobe if ivf is not None else None,
                found=int(hit.any(1).sum()), at_k=round(float(hit.any(1).mean()), 4),
                at_1=round(float(hit[:, 0].mean()), 4), seed=int(seed))


def format_self_recall(recall: Dict) -> str:
    probe = f", nprobe {recall['nprobe']}" if recall.get("nprobe") else ""
    return (
        f"self-recall {recall['at_k']:.4f}: {recall['found']} of {recall['queries']} sampled stored keys "
        f"find themselves among their {recall['k']} nearest (at rank 1: {recall['at_1']:.4f}{probe})"
    )


def adopt_index(source: str, datastore, index: faiss.Index, metric: str, recall: Dict,
                output: Optional[str] = None) -> Dict:
    """Make ``source``, an index checked by :func:`read_foreign_index` and
    :func:`self_recall`, the index of ``datastore``: ``output`` (default
    ``DSTORE/knn.index``) becomes a symbolic link to it (no copy), then the
    sidecar is written, last, as the builder writes it."""
    ds = _open_datastore(datastore)
    source = os.path.abspath(str(source))
    output = os.path.abspath(str(output or default_index_path(ds.path)))
    _remove(meta_path(output))  # an old sidecar must never vouch for the new index
    if output != source:
        link = output + ".tmp"
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(source, link)
        os.replace(link, output)
    ivf = _ivf(index)
    meta = dict(
        format_version=FORMAT_VERSION, factory=describe_index(index), metric=metric, dim=ds.dim,
        datastore_fingerprint=ds.fingerprint, datastore_size=ds.size, datastore_path=ds.path,
        ntotal=int(index.ntotal), keys_dtype=str(ds.keys.dtype),
        nprobe=int(ivf.nprobe) if ivf is not None else None,
        adopted_from=source, index_bytes=os.path.getsize(source), self_recall=recall,
        faiss_version=faiss.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_json_atomic(meta_path(output), meta)
    return meta
