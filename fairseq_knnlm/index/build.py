"""Building an index: training on a sample, then adding every key, resumably.

Adding checkpoints the index so far (``<index>.partial``, see
:mod:`.files`) so that an interrupted build continues where it stopped.  Ids
in the index are datastore positions (keys are added in order, and FAISS
numbers them sequentially), so a neighbour id indexes ``Datastore.vals``.
"""

import json
import os
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import faiss
import numpy as np
from faiss.contrib.ivf_tools import replace_ivf_quantizer
from tqdm import tqdm

from ..errors import first_line
from ..storage.datastore import Datastore
from ..storage.files import write_json_atomic
from .errors import IndexBuildError, IndexMismatchError
from .factory import METRICS, MIN_POINTS_PER_CENTROID, default_factory, ivf_of, make_index, nprobe_of, set_nprobe
from .files import (
    FORMAT_VERSION, check_index_matches, default_index_path, meta_path, open_datastore, partial_paths,
    read_index_meta, remove_files, write_index_atomic, write_index_with_sidecar,
)
from .gpu import check_gpu, flat_on_gpus
from .progress import call_with_clock, log
from .reader import KeyReader, sample_ids
from .recall import evaluate_recall, format_recall


def check_at_least(name: str, value: int, minimum: int = 1) -> int:
    """``value`` as an int; IndexBuildError naming option ``name`` if it is below ``minimum``."""
    if int(value) < minimum:
        raise IndexBuildError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_output(output: str, datastore: Datastore, overwrite: bool) -> None:
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


def train_index(index, reader: KeyReader, factory: str, n_train: int, seed: int,
           gpu: bool, progress: bool) -> None:
    ids = sample_ids(reader.size, n_train, seed)
    with tqdm(total=n_train, desc="train: read sample", unit="keys", unit_scale=True,
              disable=not progress, file=sys.stderr) as bar:
        x = reader.take(ids, bar)
    ivf = ivf_of(index)
    if gpu and ivf is not None:
        # k-means, the bulk of training, on all GPUs (the FAISS benchmarks' recipe);
        # the local keeps the GPU index alive while FAISS points at it.
        clustering_index = flat_on_gpus(ivf.d, ivf.metric_type)
        ivf.clustering_index = clustering_index
    try:
        call_with_clock(lambda: index.train(x), f"train: fit {factory} on {n_train} keys", progress)
    except RuntimeError as e:
        raise IndexBuildError(
            f"training {factory} on {n_train} keys failed ({first_line(e)}); "
            "use a larger --train-size or a smaller index (fewer centroids)"
        ) from None
    finally:
        if ivf is not None:
            ivf.clustering_index = None


class GpuAssign:
    """Runs the coarse assignment of ``index.add`` on GPUs, keeping a CPU index.

    The GPU quantizer is swapped in around each ``add`` call only, so the index
    can be checkpointed (written) at any point between calls.
    """

    def __init__(self, index: faiss.Index):
        self.index = index
        self.ivf = ivf_of(index)
        self.gpu_quantizer = None
        if self.ivf is not None:
            self.gpu_quantizer = flat_on_gpus(self.ivf.d, self.ivf.metric_type)
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


def resume(output: str, plan: Dict, log) -> Optional[Tuple[faiss.Index, Dict]]:
    """The checkpointed index and state of an unfinished build with the same plan."""
    part_index, part_state = partial_paths(output)
    if not (os.path.exists(part_index) and os.path.exists(part_state)):
        remove_files(part_index, part_state)
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
        remove_files(part_index, part_state)
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
    resumed = resume(output, plan, log)
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
            write_index_atomic(index, part_index)
            write_json_atomic(part_state, state)

    return index, state, resumed is not None, checkpoint


def add_keys(index, reader: KeyReader, add_batch: int, gpu: bool, progress: bool,
              checkpoint: Callable[[], None], checkpoint_every: float,
              on_chunk: Optional[Callable[[int], None]], span: Optional[Tuple[int, int]] = None) -> None:
    """Add the keys not yet in ``index``: all of the store, or the rows
    ``span`` = (first, end) of it with their positions as explicit ids (a
    shard of a sharded build)."""
    add = GpuAssign(index).add if gpu else (lambda x, ids=None: _add(index, x, ids))
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
    log: Callable[[str], None] = log,
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
    ds = open_datastore(dstore)
    if ds.size == 0:
        raise IndexBuildError(f"datastore {ds.path} is empty; rebuild it on some text")
    if metric not in METRICS:
        raise IndexBuildError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    check_at_least("--train-size", train_size)
    check_at_least("--add-batch", add_batch)
    check_at_least("--eval-recall", eval_recall, minimum=0)
    check_at_least("--probe", nprobe)
    output = os.path.abspath(str(output or default_index_path(ds.path)))
    check_output(output, ds, overwrite)
    if gpu:
        check_gpu()

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
    nlist = ivf_of(index).nlist if ivf_of(index) is not None else 0
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
            train_index(index, reader, factory, n_train, seed, gpu, progress)
        return index, dict(train_seconds=round(time.monotonic() - t0, 3))

    index, state, resumed, checkpoint = resumable_add(output, plan, log, start)
    if not resumed:
        checkpoint()  # training can take hours: never redo it
    add_keys(index, reader, add_batch, gpu, progress, checkpoint, checkpoint_every, on_chunk)
    checkpoint(write=False)

    set_nprobe(index, nprobe)  # saved with the index, used by --eval-recall
    meta = dict(
        plan,
        ntotal=int(index.ntotal),
        datastore_path=ds.path,
        keys_dtype=str(ds.keys.dtype),
        add_batch=int(add_batch),
        nprobe=nprobe_of(index),
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
    write_index_with_sidecar(index, meta, output)
    log(f"wrote {output} ({index.ntotal} keys) and {os.path.basename(meta_path(output))}")
    return meta


