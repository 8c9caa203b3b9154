"""Saved neighbours: what kNN-LM retrieved for every scored token, for offline tuning.

A neighbours file is a directory (``fairseq-eval-lm --knnlm --knn-save-neighbors
DIR``) holding, in the order fairseq-eval-lm scored the tokens::

    targets.npy       (n,)    int32    target token id
    lm_log_probs.npy  (n,)    float32  log p_LM(target), natural log
    dists.npy         (n, k)  float32  neighbour distances as the softmax sees them
                                       (float16 with fp16_dists)
    vals.npy          (n, k)  int32    neighbour values (next tokens); -1: no neighbour
    segments.npy      (m,)    int64    rows per scored sequence (eval-lm's summation unit)
    lm_features.npy   (n, f)  float32  optional: the LM's features of adaptive.FEATURE_NAMES
                                       (names in meta.json ``lm_feature_names``)
    counts.npy        (n, k)  int32    optional, pruned datastores only: each neighbour's
                                       count (its weight is count * exp(-d / T))
    queries.npy       (n, d)  float32  optional, runs with --knn-cache-size only: every
                                       token's key, which the continuous cache needs
    meta.json                          written last; see docs/SWEEP.md

Crash safety is the datastore's: the writer streams into ``DIR.partial``,
rewrites the fixed-size ``.npy`` headers with the final shapes, writes
``meta.json`` last and renames the directory into place, so a directory
without ``meta.json`` is never read.  A run split with ``--num-shards`` may
write ``DIR/shard-000-of-004/`` ...; :func:`read_neighbors` joins them in
shard order.
"""

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from ..errors import UserError
from .datastore import RowConcat, find_shard_dirs
from .files import META_FILE, NPY_HEADER_BYTES, PartialDirectory, check_can_write
from .validate import COUNT, POSITIVE, check_fields, first_outside, open_npy, read_json_object, scan_rows

FORMAT_VERSION = 1
KIND = "knnlm-neighbors"
TARGETS_FILE = "targets.npy"
LM_FILE = "lm_log_probs.npy"
DISTS_FILE = "dists.npy"
VALS_FILE = "vals.npy"
SEGMENTS_FILE = "segments.npy"
LM_FEATURES_FILE = "lm_features.npy"
COUNTS_FILE = "counts.npy"
QUERIES_FILE = "queries.npy"

TARGETS_DTYPE = np.dtype(np.int32)
LM_DTYPE = np.dtype(np.float32)
VALS_DTYPE = np.dtype(np.int32)
SEGMENTS_DTYPE = np.dtype(np.int64)
LM_FEATURES_DTYPE = np.dtype(np.float32)
COUNTS_DTYPE = np.dtype(np.int32)
QUERIES_DTYPE = np.dtype(np.float32)
FP16_MAX = float(np.finfo(np.float16).max)
# Distances at least this large are "no neighbour" sentinels (FAISS pads
# unfilled slots with FLT_MAX or +inf); they may become +inf in float16.
SENTINEL_DIST = 1e30

# Keys written by the writer itself; a caller's meta cannot override them.
RESERVED_META = (
    "format_version", "kind", "id", "n", "k", "num_segments", "created",
    "targets_dtype", "lm_log_probs_dtype", "dists_dtype", "vals_dtype", "segments_dtype",
    "lm_feature_names", "lm_features_dtype", "counts_dtype", "queries_dtype", "query_dim",
)


class NeighborsError(UserError):
    """A neighbours file that cannot be written or read as asked; the message says what to do."""


RERUN = "rerun fairseq-eval-lm --knnlm with --knn-save-neighbors"
# meta.json fields the readers rely on (the writer records them).
REQUIRED_FIELDS = dict(n=COUNT, k=POSITIVE, dists_dtype=("float16", "float32"))
OPTIONAL_FIELDS = dict(num_segments=COUNT, lm_feature_names=list, counts_dtype=("int32",),
                       queries_dtype=("float32",), query_dim=POSITIVE, dictionary_size=int)


def _as_numpy(x) -> np.ndarray:
    """numpy view of x; torch tensors (any device) are accepted too."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class NeighborsWriter:
    """Streams every scored token's target, LM log-prob and k neighbours to disk.

    Memory use is bounded by one :meth:`append` call.  Nothing lands at
    ``path`` until :meth:`commit`; an interrupted run leaves ``path.partial``,
    which readers refuse and the next writer replaces.
    """

    def __init__(self, path: str, k: int, meta: dict, fp16_dists: bool = False, overwrite: bool = False,
                 feature_names=None, with_counts: bool = False, query_dim: Optional[int] = None):
        if int(k) < 1:
            raise NeighborsError(f"cannot save {k} neighbours per token; --k must be at least 1")
        self.final_dir = os.path.abspath(str(path).rstrip("/"))
        self.k = int(k)
        self.dists_dtype = np.dtype(np.float16 if fp16_dists else np.float32)
        self.overwrite = overwrite
        # LM features (adaptive retrieval), one column per name; every append then gives them.
        self.feature_names = list(feature_names) if feature_names else None
        # Neighbour counts of a pruned datastore; every append then gives them.
        self.with_counts = bool(with_counts)
        # Every token's key (the continuous cache's memory), query_dim wide; every append then gives them.
        self.query_dim = int(query_dim) if query_dim else None
        try:  # fail now, not after hours of scoring
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise NeighborsError(f"neighbours metadata is not JSON-serialisable: {e}") from None
        self.meta = dict(meta)
        check_can_write(
            self.final_dir, overwrite, what="neighbours file", option="--knn-save-neighbors",
            overwrite_flag="--knn-save-neighbors-overwrite", error=NeighborsError,
        )
        self._out = PartialDirectory(self.final_dir)
        self.partial_dir = self._out.path
        self.n = 0
        self.segments: List[int] = []
        for name, dtype, row_shape in self._layout():
            self._out.stream(name, dtype, row_shape)

    def _layout(self):
        """(file, dtype, shape of one row) of every streamed array."""
        layout = (
            (TARGETS_FILE, TARGETS_DTYPE, ()),
            (LM_FILE, LM_DTYPE, ()),
            (DISTS_FILE, self.dists_dtype, (self.k,)),
            (VALS_FILE, VALS_DTYPE, (self.k,)),
        )
        if self.feature_names:
            layout += ((LM_FEATURES_FILE, LM_FEATURES_DTYPE, (len(self.feature_names),)),)
        if self.with_counts:
            layout += ((COUNTS_FILE, COUNTS_DTYPE, (self.k,)),)
        if self.query_dim:
            layout += ((QUERIES_FILE, QUERIES_DTYPE, (self.query_dim,)),)
        return layout

    def append(self, targets, lm_log_probs, dists, neighbor_vals, lengths=None, lm_features=None,
               counts=None, queries=None) -> None:
        """Add n scored tokens, in the order fairseq-eval-lm scores them.

        targets (n,) int, lm_log_probs (n,) float, dists (n, k) float,
        neighbor_vals (n, k) int.  ``lengths``: optional row counts of the
        sequences (hypotheses) these rows belong to, summing to n; without it
        the whole call counts as one sequence.  Sequences are the units
        fairseq-eval-lm sums in float32, so passing them lets the sweep
        reproduce its perplexity to the last digit.  ``lm_features`` (n, f):
        required when the writer was made with ``feature_names``, refused otherwise;
        ``counts`` (n, k) likewise with ``with_counts``, ``queries`` (n, query_dim)
        with ``query_dim``.
        """
        targets, lm = _as_numpy(targets), _as_numpy(lm_log_probs)
        dists, vals = _as_numpy(dists), _as_numpy(neighbor_vals)
        n = len(targets)
        if (
            targets.ndim != 1 or lm.shape != (n,) or dists.shape != (n, self.k)
            or vals.shape != (n, self.k)
        ):
            raise NeighborsError(
                f"cannot append targets {targets.shape}, lm_log_probs {lm.shape}, dists "
                f"{dists.shape}, vals {vals.shape} to neighbours saved with k={self.k}; "
                f"pass (n,), (n,), (n, {self.k}), (n, {self.k}) arrays"
            )
        if self.feature_names:
            width = len(self.feature_names)
            if lm_features is None or _as_numpy(lm_features).shape != (n, width):
                got = None if lm_features is None else _as_numpy(lm_features).shape
                raise NeighborsError(f"pass lm_features of shape ({n}, {width}) with every append, got {got}")
        elif lm_features is not None:
            raise NeighborsError("lm_features given to a writer made without feature_names")
        if self.with_counts != (counts is not None) or (
            counts is not None and _as_numpy(counts).shape != (n, self.k)
        ):
            raise NeighborsError(
                f"pass neighbour counts of shape ({n}, {self.k}) with every append exactly when "
                f"the writer has with_counts ({self.with_counts})"
            )
        if bool(self.query_dim) != (queries is not None) or (
            queries is not None and _as_numpy(queries).shape != (n, self.query_dim)
        ):
            raise NeighborsError(
                f"pass queries of shape ({n}, {self.query_dim}) with every append exactly when "
                "the writer has a query_dim"
            )
        if not (np.issubdtype(targets.dtype, np.integer) and np.issubdtype(vals.dtype, np.integer)):
            raise NeighborsError(
                f"targets and neighbour values must be integer arrays, got {targets.dtype} and {vals.dtype}"
            )
        if lengths is None:
            lengths = [n] if n else []
        else:
            lengths = [int(x) for x in _as_numpy(lengths).reshape(-1)]
            if sum(lengths) != n or any(x < 0 for x in lengths):
                raise NeighborsError(
                    f"segment lengths {lengths[:8]}... must be non-negative and sum to the {n} rows appended"
                )
        if n == 0:
            return
        with np.errstate(over="ignore"):  # float16 overflow is checked just below
            dists_out = np.ascontiguousarray(dists, dtype=self.dists_dtype)
        if self.dists_dtype == np.float16:
            d32 = np.asarray(dists, dtype=np.float32)
            overflow = np.isinf(dists_out) & np.isfinite(d32) & (np.abs(d32) < SENTINEL_DIST)
            if overflow.any():
                raise NeighborsError(
                    f"distance {float(d32[overflow][0]):.6g} does not fit float16 "
                    f"(max {FP16_MAX:g}); save neighbours without --knn-save-neighbors-fp16"
                )
        self._out.append(TARGETS_FILE, targets)
        self._out.append(LM_FILE, lm)
        self._out.append(DISTS_FILE, dists_out)
        self._out.append(VALS_FILE, vals)
        if self.feature_names:
            self._out.append(LM_FEATURES_FILE, _as_numpy(lm_features))
        if self.with_counts:
            self._out.append(COUNTS_FILE, _as_numpy(counts))
        if self.query_dim:
            self._out.append(QUERIES_FILE, _as_numpy(queries))
        self.segments.extend(x for x in lengths if x > 0)
        self.n += n

    def commit(self) -> str:
        """Finish the files, write meta.json last, move into place; returns the path."""
        self._out.finish_arrays()
        segments = np.asarray(self.segments, dtype=SEGMENTS_DTYPE)
        self._out.write_array(SEGMENTS_FILE, segments)
        meta = {key: value for key, value in self.meta.items() if key not in RESERVED_META}
        meta.update(
            format_version=FORMAT_VERSION,
            kind=KIND,
            id=uuid.uuid4().hex,
            n=self.n,
            k=self.k,
            num_segments=len(segments),
            targets_dtype=TARGETS_DTYPE.name,
            lm_log_probs_dtype=LM_DTYPE.name,
            dists_dtype=self.dists_dtype.name,
            vals_dtype=VALS_DTYPE.name,
            segments_dtype=SEGMENTS_DTYPE.name,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        if self.feature_names:
            meta.update(lm_feature_names=self.feature_names, lm_features_dtype=LM_FEATURES_DTYPE.name)
        if self.with_counts:
            meta.update(counts_dtype=COUNTS_DTYPE.name)
        if self.query_dim:
            meta.update(queries_dtype=QUERIES_DTYPE.name, query_dim=self.query_dim)
        return self._out.commit(meta)

    def abort(self) -> None:
        """Drop everything written so far."""
        self._out.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


@dataclass
class Neighbors:
    """A saved neighbours file, opened read-only (arrays memory-mapped)."""

    path: str
    meta: Dict
    targets: np.ndarray       # (n,) int32
    lm_log_probs: np.ndarray  # (n,) float32
    dists: np.ndarray         # (n, k) float32 or float16 (RowConcat when sharded)
    vals: np.ndarray          # (n, k) int32 (RowConcat when sharded)
    segments: np.ndarray      # (m,) int64, rows per scored sequence, sum n
    lm_features: Optional[np.ndarray] = None  # (n, f) float32, files saved with LM features only
    counts: Optional[np.ndarray] = None       # (n, k) int32, neighbours of pruned datastores only
    queries: Optional[np.ndarray] = None      # (n, d) float32, runs with --knn-cache-size only

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    def __len__(self) -> int:
        return self.n

    @property
    def feature_names(self) -> List[str]:
        """Names of the columns of ``lm_features`` (empty for files saved without them)."""
        return list(self.meta.get("lm_feature_names") or []) if self.lm_features is not None else []

    def check_k(self, k: int) -> None:
        if k > self.k:
            raise NeighborsError(
                f"--k {k} exceeds the {self.k} neighbours saved in {self.path}; lower --k "
                f"or save again with --k {k} --knn-save-neighbors"
            )


def _read_meta(path: str) -> Dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise NeighborsError(f"{path} holds no complete saved neighbours (no {META_FILE}); {RERUN}")
    meta = read_json_object(meta_path, NeighborsError, RERUN)
    if meta.get("kind") != KIND:
        raise NeighborsError(
            f"{path} is not a saved-neighbours file (a datastore?); pass the --knn-save-neighbors directory"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise NeighborsError(
            f"{path} has neighbours format {version}, this version reads {FORMAT_VERSION}; {RERUN}"
        )
    check_fields(meta, REQUIRED_FIELDS, meta_path, NeighborsError, RERUN, OPTIONAL_FIELDS)
    if not all(isinstance(name, str) for name in meta.get("lm_feature_names") or []):
        raise NeighborsError(f"{meta_path}: field 'lm_feature_names' is not a list of names; {RERUN}")
    return meta


def _open_array(path: str, name: str, dtype, shape) -> np.ndarray:
    return open_npy(os.path.join(path, name), dtype, shape, NPY_HEADER_BYTES, NeighborsError, RERUN)


def _check_contents(path: str, meta: Dict, arrays: Dict) -> None:
    """Targets and values are token ids (-1: no neighbour) of the run's dictionary, and no
    LM log-probability or distance is NaN: what a damaged file shows (a vectorised pass)."""
    vocab = meta.get("dictionary_size")
    known = isinstance(vocab, int) and vocab > 0
    high = vocab if known else np.iinfo(np.int32).max
    dictionary = f"the run's {vocab:,}-type dictionary" if known else "a dictionary"
    for name, key, low in ((TARGETS_FILE, "targets", 0), (VALS_FILE, "vals", -1)):
        found = first_outside(arrays[key], low, high)
        if found is not None:
            raise NeighborsError(f"{os.path.join(path, name)} row {found[0]:,} holds {found[1]:,}, not a token "
                                 f"id of {dictionary}: the file is damaged; {RERUN}")
    for name, key in ((LM_FILE, "lm_log_probs"), (DISTS_FILE, "dists")):
        for lo, block in scan_rows(arrays[key]):
            with np.errstate(over="ignore", invalid="ignore"):  # inf - inf: the exact test decides
                suspect = np.isnan(block.sum(dtype=np.float32))
            if suspect and np.isnan(block).any():
                row = lo + int(np.flatnonzero(np.isnan(block.reshape(len(block), -1)).any(axis=1))[0])
                raise NeighborsError(f"{os.path.join(path, name)} row {row:,} is NaN: the file is damaged; {RERUN}")


def _read_single(path: str) -> Neighbors:
    meta = _read_meta(path)
    n, k = int(meta["n"]), int(meta["k"])
    dists_dtype = np.dtype(meta["dists_dtype"])
    if dists_dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise NeighborsError(f"{path} has dists of dtype {dists_dtype}; {RERUN}")
    num_segments = int(meta.get("num_segments", 0))
    arrays = dict(
        targets=_open_array(path, TARGETS_FILE, TARGETS_DTYPE, (n,)),
        lm_log_probs=_open_array(path, LM_FILE, LM_DTYPE, (n,)),
        dists=_open_array(path, DISTS_FILE, dists_dtype, (n, k)),
        vals=_open_array(path, VALS_FILE, VALS_DTYPE, (n, k)),
        segments=np.array(_open_array(path, SEGMENTS_FILE, SEGMENTS_DTYPE, (num_segments,))),
    )
    names = meta.get("lm_feature_names")
    if names:
        arrays["lm_features"] = _open_array(path, LM_FEATURES_FILE, LM_FEATURES_DTYPE, (n, len(names)))
    if "counts_dtype" in meta:
        arrays["counts"] = _open_array(path, COUNTS_FILE, COUNTS_DTYPE, (n, k))
    if "queries_dtype" in meta:
        arrays["queries"] = _open_array(path, QUERIES_FILE, QUERIES_DTYPE, (n, int(meta.get("query_dim") or 0)))
    if int(arrays["segments"].sum()) != n or (arrays["segments"] < 0).any():
        raise NeighborsError(f"{os.path.join(path, SEGMENTS_FILE)} does not add up to {n} rows; {RERUN}")
    _check_contents(path, meta, arrays)
    return Neighbors(path=path, meta=meta, **arrays)


# Fields every shard of one run must agree on.
SHARD_FIELDS = (
    "k", "dists_dtype", "sim_func", "dstore_fingerprint", "checkpoint_sha256",
    "dictionary_md5", "data", "split", "num_shards", "counts_dtype",
)


def read_neighbors(path: str) -> Neighbors:
    """Open a saved neighbours directory (single, or ``shard-*-of-*`` subdirectories).

    Raises :class:`NeighborsError` with a one-line fix for incomplete,
    truncated or foreign files.
    """
    path = os.path.abspath(str(path).rstrip("/"))
    if not os.path.isdir(path):
        if os.path.isdir(path + ".partial"):
            raise NeighborsError(
                f"only {path}.partial exists: the run that saved these neighbours did not finish; {RERUN}"
            )
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise NeighborsError(f"{path} {what}; pass the directory written by --knn-save-neighbors")
    if os.path.exists(os.path.join(path, META_FILE)):
        return _read_single(path)
    shard_dirs = find_shard_dirs(path, NeighborsError, RERUN)
    if shard_dirs is None:
        return _read_single(path)  # raises: no meta.json
    shards = [_read_single(shard_dir) for shard_dir in shard_dirs]
    first = shards[0].meta
    for shard in shards[1:]:
        for field in SHARD_FIELDS:
            if shard.meta.get(field) != first.get(field):
                raise NeighborsError(
                    f"shards of {path} disagree on {field}; save them all with the same model and flags"
                )
    meta = dict(first)
    with_features = all(s.lm_features is not None for s in shards) and len(
        {tuple(s.feature_names) for s in shards}) == 1
    if not with_features:
        meta.pop("lm_feature_names", None)
    meta.update(n=sum(s.n for s in shards), num_segments=sum(len(s.segments) for s in shards),
                shard_ids=[s.meta.get("id") for s in shards])
    return Neighbors(
        path=path,
        meta=meta,
        targets=np.concatenate([s.targets for s in shards]),
        lm_log_probs=np.concatenate([s.lm_log_probs for s in shards]),
        dists=RowConcat([s.dists for s in shards]),
        vals=RowConcat([s.vals for s in shards]),
        segments=np.concatenate([s.segments for s in shards]),
        lm_features=np.concatenate([s.lm_features for s in shards]) if with_features else None,
        counts=RowConcat([s.counts for s in shards]) if first.get("counts_dtype") else None,
        queries=RowConcat([s.queries for s in shards]) if all(s.queries is not None for s in shards) else None,
    )
