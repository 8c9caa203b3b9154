"""The datastore: (context key, next token) pairs on disk.

A datastore is a directory holding ``keys.npy`` (N x dim, float16 or float32),
``vals.npy`` (N, int32) and ``meta.json``; a pruned store (fairseq-knnlm-prune)
also holds ``counts.npy`` (N, int32): how many original entries each entry
stands for, its weight in the kNN softmax.  A sharded pass writes one such
directory per shard, ``shard-000-of-004/`` ..., below the datastore directory;
:class:`Datastore` presents all shards as one store in corpus order.

Crash safety: a pass writes into a ``.partial`` directory and renames it into
place after ``meta.json`` is written (:class:`.files.PartialDirectory`), so a
directory without ``meta.json`` is never accepted.
"""

import hashlib
import os
import time
import uuid
from typing import Dict, List, Optional

import numpy as np

from ..errors import UserError
from . import files
from .files import META_FILE, NPY_HEADER_BYTES, PARTIAL_SUFFIX
from .validate import (
    COUNT,
    NAMED_ENTRIES,
    POSITIVE,
    check_fields,
    find_nonfinite_rows,
    first_outside,
    nonfinite_keys_message,
    nonfinite_rows,
    open_npy,
    read_json_object,
)

FORMAT_VERSION = 1
KEYS_FILE = "keys.npy"
VALS_FILE = "vals.npy"
VALS_DTYPE = np.int32
COUNTS_FILE = "counts.npy"
COUNTS_DTYPE = np.int32
# meta.json field of a store whose keys stay in a file made elsewhere: the original's
# headerless keys (fairseq-knnlm-import), or the first rows of another store's keys.npy
# (fairseq-knnlm-prefix): {"path", "offset", "sampled_rows_sha256"} and, when the file
# holds more rows than the store uses, "file_bytes" (its size, re-checked).
EXTERNAL_KEYS = "external_keys"
# meta.json fields the writer records: the smallest and largest value (and
# count) written, so that opening a large store can trust them instead of
# scanning every value (--knn-check-datastore scans anyway).
VALS_RANGE = "vals_range"
COUNTS_RANGE = "counts_range"
# Stores up to this many entries are always scanned when opened for --knnlm
# (a vectorised pass: milliseconds).
ALWAYS_SCAN_ENTRIES = 1 << 24
KEYS_DTYPES = ("float16", "float32")
# What every meta.json holds (the writer sets these), and what some hold.
REQUIRED_META = dict(format_version=int, id=str, size=COUNT, dim=POSITIVE, keys_dtype=KEYS_DTYPES,
                     vals_dtype=("int32",))
OPTIONAL_META = dict(counts_dtype=("int32",), external_keys=dict, vals_range=list, counts_range=list)
EXTERNAL_KEYS_FIELDS = dict(path=str, offset=COUNT, sampled_rows_sha256=str)
EXTERNAL_KEYS_OPTIONAL = dict(file_bytes=COUNT)


class DatastoreError(UserError):
    """A datastore that cannot be used as asked; the message says what to do."""


def shard_dirname(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:03d}-of-{num_shards:03d}"


def find_shard_dirs(path: str, error, fix: str) -> Optional[List[str]]:
    """The shard directories ``shard-000-of-00N`` ... below ``path``, in shard
    order, or None if it holds none (unfinished ``.partial`` ones don't count).
    ``error`` (ending with ``fix``) when one is misnamed or some are missing."""
    names = sorted(n for n in os.listdir(path) if n.startswith("shard-") and not n.endswith(PARTIAL_SUFFIX))
    if not names:
        return None
    try:
        num_shards = int(names[0].rsplit("-of-", 1)[1])
    except (IndexError, ValueError):
        raise error(f"{os.path.join(path, names[0])} is not a shard directory (shard-III-of-NNN); {fix}") from None
    expected = [shard_dirname(i, num_shards) for i in range(num_shards)]
    missing = sorted(set(expected) - set(names))
    if missing or len(names) != num_shards:
        raise error(
            f"{path} is missing shard(s) {', '.join(missing) or names}; "
            "run every --shard-id with the same --num-shards"
        )
    return [os.path.join(path, n) for n in expected]


def sampled_rows_sha256(keys, rows: int = 64) -> str:
    """sha256 of ``rows`` rows spread over ``keys``: a cheap identity of a key file too
    large to hash whole."""
    ids = np.unique(np.linspace(0, len(keys) - 1, num=min(rows, len(keys))).astype(np.int64))
    return hashlib.sha256(np.ascontiguousarray(keys[ids]).tobytes()).hexdigest()


def dictionary_md5(dictionary) -> str:
    """Identity of a fairseq Dictionary: its symbols in index order."""
    return hashlib.md5("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


class DatastoreWriter:
    """Streams keys and values of one datastore (or shard) to disk.

    Nothing lands at ``final_dir`` until :meth:`commit`; an interrupted writer
    leaves only ``<final_dir>.partial``, which readers refuse and the next
    writer replaces.
    """

    def __init__(self, final_dir: str, dim: int, keys_dtype, overwrite: bool = False,
                 with_counts: bool = False):
        self.final_dir = os.path.abspath(os.fspath(final_dir).rstrip("/"))
        self.dim = int(dim)
        self.keys_dtype = np.dtype(keys_dtype)
        self.overwrite = overwrite
        check_can_write(self.final_dir, overwrite)
        self._out = files.PartialDirectory(self.final_dir)
        self.partial_dir = self._out.path
        self.size = 0
        self._out.stream(KEYS_FILE, self.keys_dtype, (self.dim,))
        self._out.stream(VALS_FILE, VALS_DTYPE)
        self.with_counts = bool(with_counts)
        if with_counts:
            self._out.stream(COUNTS_FILE, COUNTS_DTYPE)
        self._ranges = {VALS_RANGE: None, COUNTS_RANGE: None}  # (min, max) written so far

    def append(self, keys: np.ndarray, vals: np.ndarray, counts: np.ndarray = None) -> None:
        """Add entries; keys with NaN or inf are refused (the writer aborts: nothing is kept)."""
        if keys.ndim != 2 or keys.shape[1] != self.dim or len(keys) != len(vals):
            raise DatastoreError(
                f"cannot append keys {keys.shape} / vals {vals.shape} to a "
                f"datastore of dimension {self.dim}"
            )
        if (counts is None) == self.with_counts or (counts is not None and len(counts) != len(vals)):
            raise DatastoreError("counts must be given with every append exactly when the writer has with_counts")
        with np.errstate(over="ignore"):  # float16 overflow is refused just below
            keys = np.ascontiguousarray(keys, dtype=self.keys_dtype)
        bad = nonfinite_rows(keys)
        if len(bad):
            self.abort()
            overflow = self.keys_dtype == np.float16 and bool(np.isinf(keys[bad]).any())
            raise DatastoreError(nonfinite_keys_message(
                f"cannot write datastore {self.final_dir}", bad[:NAMED_ENTRIES] + self.size, len(bad),
                f"of the {len(keys):,} keys of entries {self.size:,} to {self.size + len(keys) - 1:,}", overflow,
                "nothing was written" + ("" if overflow else "; check the model (a checkpoint or --fp16 run "
                                         "that produces NaN or inf hidden states)"),
            ))
        self._out.append(KEYS_FILE, keys)
        self._out.append(VALS_FILE, vals)
        self._track(VALS_RANGE, vals)
        if counts is not None:
            self._out.append(COUNTS_FILE, counts)
            self._track(COUNTS_RANGE, counts)
        self.size += len(vals)

    def _track(self, field: str, values) -> None:
        if len(values):
            lo, hi = int(np.min(values)), int(np.max(values))
            old = self._ranges[field]
            self._ranges[field] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def commit(self, meta: Dict) -> str:
        """Finish the files, write meta.json last, then move into place."""
        meta = dict(meta)
        meta.pop(EXTERNAL_KEYS, None)  # e.g. meta copied from an imported store
        meta.update(
            format_version=FORMAT_VERSION,
            id=uuid.uuid4().hex,
            size=self.size,
            dim=self.dim,
            keys_dtype=self.keys_dtype.name,
            vals_dtype=np.dtype(VALS_DTYPE).name,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        if self.with_counts:
            meta["counts_dtype"] = np.dtype(COUNTS_DTYPE).name
        else:
            meta.pop("counts_dtype", None)  # e.g. meta copied from a pruned store
        for field, seen in self._ranges.items():
            meta.pop(field, None)  # e.g. meta copied from the store this one was made from
            if seen is not None:
                meta[field] = list(seen)
        return self._out.commit(meta)

    def abort(self) -> None:
        self._out.abort()


def check_can_write(final_dir: str, overwrite: bool, what: str = "datastore", option: str = "--dstore",
                    overwrite_flag: str = "--dstore-overwrite", error=DatastoreError) -> None:
    """:func:`.files.check_can_write` with the datastore pass's options as defaults."""
    files.check_can_write(final_dir, overwrite, what, option, overwrite_flag, error)


def rebuild_hint(meta, path: str) -> str:
    """What to do about a damaged datastore: rerun whatever wrote it."""
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("pruned"):
        return f"rerun fairseq-knnlm-prune --output {path} --overwrite"
    if meta.get("imported_from"):
        return f"rerun fairseq-knnlm-import --dstore {path} --dstore-overwrite"
    if meta.get("prefix_of"):
        return f"rerun fairseq-knnlm-prefix --output {path} --overwrite"
    return "rerun the --save-knnlm-dstore pass with --dstore-overwrite"


class _Shard:
    def __init__(self, path: str):
        self.path = path
        meta_path = os.path.join(path, META_FILE)
        if not os.path.exists(meta_path):
            raise DatastoreError(
                f"{path} is not a complete datastore (no {META_FILE}); "
                "rerun the --save-knnlm-dstore pass"
            )
        self.meta = read_json_object(
            meta_path, DatastoreError, "the datastore is damaged: rebuild it with the command that wrote it"
        )
        self.redo = rebuild_hint(self.meta, path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DatastoreError(
                f"{path} has datastore format {self.meta.get('format_version')}, "
                f"this version reads {FORMAT_VERSION}; rebuild the datastore"
            )
        check_fields(self.meta, REQUIRED_META, meta_path, DatastoreError, self.redo, OPTIONAL_META)
        self.size = self.meta["size"]
        self.dim = self.meta["dim"]
        self.has_counts = "counts_dtype" in self.meta
        self._check_external_keys()

    def _check_external_keys(self) -> None:
        """Keys referenced in place (fairseq-knnlm-import, fairseq-knnlm-prefix) must
        still be the file that was checked: same size, same sampled rows."""
        external = self.meta.get(EXTERNAL_KEYS)
        if external is None:
            return
        check_fields(external, EXTERNAL_KEYS_FIELDS, f"{os.path.join(self.path, META_FILE)} ({EXTERNAL_KEYS})",
                     DatastoreError, self.redo, EXTERNAL_KEYS_OPTIONAL)
        file = external["path"]
        redo = f"{self.redo}, or restore {file}"
        row_bytes = self.dim * np.dtype(self.meta["keys_dtype"]).itemsize
        expected = external.get("file_bytes", external["offset"] + self.size * row_bytes)
        if expected < external["offset"] + self.size * row_bytes:
            raise DatastoreError(f"{os.path.join(self.path, META_FILE)} ({EXTERNAL_KEYS}) names more keys than "
                                 f"{file} holds; {self.redo}")
        if not os.path.isfile(file) or os.path.getsize(file) != expected:
            raise DatastoreError(f"the keys of {self.path} ({file}) are missing or changed size; {redo}")
        if sampled_rows_sha256(self.load(KEYS_FILE, False)) != external["sampled_rows_sha256"]:
            since = "the import" if self.meta.get("imported_from") else "this store was made"
            raise DatastoreError(f"the keys of {self.path} ({file}) changed since {since}; {redo}")

    def _layout(self, name: str):
        """(dtype, shape) of one of this shard's arrays, as meta.json describes it."""
        if name == KEYS_FILE:
            return self.meta["keys_dtype"], (self.size, self.dim)
        return self.meta["counts_dtype" if name == COUNTS_FILE else "vals_dtype"], (self.size,)

    def load(self, name: str, in_memory: bool) -> np.ndarray:
        """One of the shard's arrays, checked against meta.json (memory-mapped unless ``in_memory``)."""
        dtype, shape = self._layout(name)
        external = self.meta.get(EXTERNAL_KEYS) if name == KEYS_FILE else None
        if external:
            arr = np.memmap(external["path"], dtype=dtype, mode="r", offset=external["offset"], shape=shape)
        else:
            arr = open_npy(os.path.join(self.path, name), dtype, shape, NPY_HEADER_BYTES, DatastoreError, self.redo)
        return np.array(arr) if in_memory else arr

    def check_values(self, vocab_size: int, scan: bool) -> None:
        """Values must be token ids of a ``vocab_size`` dictionary and counts at
        least 1: the ranges the writer recorded, or (``scan``, or nothing
        recorded) every value."""
        dictionary = f"the {vocab_size:,}-type dictionary (0 to {vocab_size - 1:,})"
        checks = [(VALS_FILE, VALS_RANGE, 0, vocab_size, f"a token id of {dictionary}", f"token ids of {dictionary}")]
        if self.has_counts:
            checks.append((COUNTS_FILE, COUNTS_RANGE, 1, np.iinfo(COUNTS_DTYPE).max + 1, "a count of at least 1",
                           "counts of at least 1"))
        for name, field, low, high, one, all_of in checks:
            file = os.path.join(self.path, name)
            recorded = self.meta.get(field)
            valid = (isinstance(recorded, list) and len(recorded) == 2
                     and all(isinstance(x, int) and not isinstance(x, bool) for x in recorded))
            if valid and not scan:
                if recorded[0] >= low and recorded[1] < high:
                    continue
                raise DatastoreError(
                    f"{file} holds values {recorded[0]:,} to {recorded[1]:,} ({field} in {META_FILE}), "
                    f"not all {all_of}; " + self._wrong_values_hint(name)
                )
            if not self.size:
                continue
            found = first_outside(self.load(name, False), low, high)
            if found is not None:
                raise DatastoreError(
                    f"{file} entry {found[0]:,} holds {found[1]:,}, not {one}; " + self._wrong_values_hint(name)
                )

    def _wrong_values_hint(self, name: str) -> str:
        if name == VALS_FILE:
            return f"the store was made with another dictionary or is damaged: {self.redo}"
        return f"the store is damaged: {self.redo}"

    def check_keys(self) -> None:
        """Every key finite (reads all of them)."""
        keys = self.load(KEYS_FILE, False)
        ids, count = find_nonfinite_rows(keys)
        if count:
            overflow = keys.dtype == np.float16 and bool(np.isinf(np.asarray(keys[ids], np.float32)).any())
            file = self.meta.get(EXTERNAL_KEYS, {}).get("path") or os.path.join(self.path, KEYS_FILE)
            raise DatastoreError(nonfinite_keys_message(
                file, ids, count, f"of {self.size:,}", overflow, f"the store cannot be used: {self.redo}"))


class RowConcat:
    """Read-only row view over several arrays, as if concatenated along axis 0."""

    def __init__(self, parts: List[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]),) + tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = []
            for part, offset in zip(self.parts, self.offsets[:-1]):
                lo, hi = max(start - offset, 0), min(stop - offset, len(part))
                if lo < hi:
                    out.append(part[lo:hi])
            if not out:
                return np.empty((0,) + self.shape[1:], dtype=self.dtype)
            return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])
        ids = np.asarray(index)
        if ids.ndim == 0:
            return self[int(ids) : int(ids) + 1][0]
        flat = ids.reshape(-1)
        out = np.empty((len(flat),) + self.shape[1:], dtype=self.dtype)
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        for p, (part, offset) in enumerate(zip(self.parts, self.offsets[:-1])):
            sel = which == p
            if sel.any():
                out[sel] = part[flat[sel] - offset]
        return out.reshape(ids.shape + self.shape[1:])


def _joined(parts: List[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Datastore:
    """A complete datastore, single or sharded, opened read-only.

    ``keys`` indexes like an (N, dim) array in corpus order: memory-mapped
    (the shards' maps behind one :class:`RowConcat` when sharded) unless
    ``in_memory``.  ``vals`` and ``counts`` are (N,) arrays in RAM, read once
    when the store is opened: at 4 bytes an entry they cost little, and every
    batch of kNN-LM reads them at random positions.
    """

    def __init__(self, path: str, in_memory: bool = False):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise DatastoreError(
                f"no datastore at {self.path}; run fairseq-eval-lm with "
                "--save-knnlm-dstore --dstore DIR first"
            )
        self.shards = [_Shard(p) for p in self._shard_paths()]
        first = self.shards[0].meta
        for shard in self.shards[1:]:
            for field in ("dim", "keys_dtype", "keytype", "dictionary_md5", "checkpoint_sha256"):
                if shard.meta.get(field) != first.get(field):
                    raise DatastoreError(
                        f"shards of {self.path} disagree on {field}; "
                        "rebuild them with the same model and flags"
                    )
        self.dim = self.shards[0].dim
        self.size = sum(s.size for s in self.shards)
        keys = [s.load(KEYS_FILE, in_memory) for s in self.shards]
        self.keys = keys[0] if len(keys) == 1 else RowConcat(keys)
        self.vals = _joined([s.load(VALS_FILE, True) for s in self.shards])
        # Entry weights of a pruned store (None: every entry counts once).
        self.counts = None
        if any(s.has_counts for s in self.shards):
            if not all(s.has_counts for s in self.shards):
                raise DatastoreError(f"some shards of {self.path} are pruned and some are not; prune the whole store")
            self.counts = _joined([s.load(COUNTS_FILE, True) for s in self.shards])
        self.meta = dict(first)
        self.meta["size"] = self.size
        self.meta["num_shards"] = len(self.shards)

    def _shard_paths(self) -> List[str]:
        if os.path.exists(os.path.join(self.path, META_FILE)):
            return [self.path]
        paths = find_shard_dirs(self.path, DatastoreError, "move it away or rerun the pass")
        if paths is None:
            raise DatastoreError(
                f"{self.path} is not a complete datastore (no {META_FILE}); "
                "rerun the --save-knnlm-dstore pass"
            )
        return paths

    def check_values(self, vocab_size: int, full: bool = False) -> None:
        """DatastoreError unless every value is a token id of a ``vocab_size``
        dictionary (and every count of a pruned store at least 1).

        Stores of up to ALWAYS_SCAN_ENTRIES entries are scanned (a vectorised
        pass); larger ones trust the ranges their writer recorded in meta.json
        unless ``full`` (--knn-check-datastore), which also scans every key for
        NaN and inf.
        """
        scan = full or self.size <= ALWAYS_SCAN_ENTRIES
        for shard in self.shards:
            shard.check_values(int(vocab_size), scan)
            if full:
                shard.check_keys()

    @property
    def fingerprint(self) -> str:
        """Identity of this exact store; indexes and neighbour files record it."""
        ids = ",".join(s.meta["id"] for s in self.shards)
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

