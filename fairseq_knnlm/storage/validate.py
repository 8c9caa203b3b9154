"""Checks that every artefact reader shares.

Each turns malformed input (a damaged copy, a full disk, a bad conversion)
into a one-line :class:`~fairseq_knnlm.errors.UserError` of the caller's class
that names the file and ends with the caller's ``fix``: what to do about it.
"""

import json
import os
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from ..errors import first_line

# Elements per step of a chunked scan: bounded memory whatever the array size.
SCAN_ELEMENTS = 1 << 24
# Entries named in a message before "...".
NAMED_ENTRIES = 5
FP16_MAX = float(np.finfo(np.float16).max)


def read_json_object(path: str, error, fix: str) -> Dict:
    """The JSON object stored at ``path``; ``error`` if it is missing, unreadable,
    not JSON (truncated, corrupted bytes) or not an object."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise error(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror}); {fix}") from None
    except (ValueError, RecursionError) as e:  # includes JSONDecodeError, UnicodeDecodeError
        raise error(f"{path} is not valid JSON ({first_line(e)}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


# Field kinds for check_fields: a type, one of these names, or a tuple of allowed values.
COUNT = "a non-negative integer"
POSITIVE = "a positive integer"


def _matches(value, kind) -> bool:
    if kind in (COUNT, POSITIVE):
        return isinstance(value, int) and not isinstance(value, bool) and value >= (kind == POSITIVE)
    if isinstance(kind, tuple):
        return isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in kind
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(map(repr, kind))
    if isinstance(kind, type):
        return {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(kind, kind.__name__)
    return kind


def check_fields(meta: Dict, required: Dict, path: str, error, fix: str, optional: Optional[Dict] = None) -> None:
    """Every ``required`` field present with its kind, and every ``optional`` one
    that is present too."""
    for fields, needed in ((required, True), (optional or {}, False)):
        for name, kind in fields.items():
            if name not in meta:
                if needed:
                    raise error(f"{path} lacks the field {name!r}; {fix}")
                continue
            value = meta[name]
            if not _matches(value, kind):
                shown = repr(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise error(f"{path}: field {name!r} is {shown}, expected {_describe(kind)}; {fix}")


def open_npy(file: str, dtype, shape: Tuple[int, ...], header_bytes: int, error, fix: str,
             described_by: str = "meta.json") -> np.ndarray:
    """``file`` memory-mapped, after checking that it is a .npy file of exactly
    ``dtype`` and ``shape`` (C order) behind a ``header_bytes`` header."""
    dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
    expected = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = os.path.getsize(file) if os.path.isfile(file) else -1
    if actual < 0:
        raise error(f"{file} is missing; {fix}")
    if actual != expected:
        raise error(f"{file} is truncated or corrupt ({actual:,} bytes, expected {expected:,}); {fix}")
    try:
        arr = np.load(file, mmap_mode="r")
    except Exception as e:  # numpy raises many kinds for a damaged header; all mean the same
        raise error(f"{file} is not a readable .npy file ({first_line(e)}); {fix}") from None
    if arr.dtype != dtype or arr.shape != shape:
        raise error(
            f"{file} holds {arr.dtype} {arr.shape} by its header, {described_by} says {dtype} {shape}; {fix}"
        )
    if arr.ndim > 1 and not arr.flags.c_contiguous:
        raise error(f"{file} is stored in Fortran order by its header; {fix}")
    if getattr(arr, "offset", header_bytes) != header_bytes:
        raise error(f"{file} has a {arr.offset}-byte header, expected {header_bytes}; {fix}")
    return arr


# ------------------------------------------------------------------ contents
def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Positions of the rows of ``block`` holding NaN or ±inf.

    One sum in the usual all-finite case (NaN and inf propagate through it);
    only a non-finite sum, which a sum overflowing from huge finite values
    also gives, is followed by the exact elementwise test.
    """
    block = np.asarray(block)
    if block.size == 0:
        return np.empty(0, dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        total = block.sum(dtype=np.float32 if block.dtype == np.float16 else None)
    if np.isfinite(total):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))


def scan_rows(array, rows: Optional[int] = None) -> Iterable[Tuple[int, np.ndarray]]:
    """(first row, block) of ``array`` in blocks of bounded size."""
    n = len(array)
    width = int(np.prod(array.shape[1:], dtype=np.int64)) if len(array.shape) > 1 else 1
    rows = rows or max(1, SCAN_ELEMENTS // max(width, 1))
    for lo in range(0, n, rows):
        yield lo, np.asarray(array[lo : lo + rows])


def find_nonfinite_rows(array) -> Tuple[np.ndarray, int]:
    """(up to NAMED_ENTRIES positions of rows with NaN or ±inf, how many there are)."""
    found, count = [], 0
    for lo, block in scan_rows(array):
        bad = nonfinite_rows(block)
        count += len(bad)
        if len(found) < NAMED_ENTRIES:
            found.extend((bad[: NAMED_ENTRIES - len(found)] + lo).tolist())
    return np.asarray(found, dtype=np.int64), count


def name_entries(ids, count: int) -> str:
    """'entries 3, 17 and 40' / 'entries 3, 17, 40, 41, 90, ...'."""
    ids = [f"{int(i):,}" for i in ids]
    if count > len(ids):
        return "entries " + ", ".join(ids) + ", ..."
    if len(ids) == 1:
        return "entry " + ids[0]
    return "entries " + ", ".join(ids[:-1]) + " and " + ids[-1]


def nonfinite_keys_message(where: str, ids, count: int, scope: str, overflow: bool, fix: str) -> str:
    """The one-line refusal of keys with NaN or inf.  ``overflow``: they are
    float16 keys holding inf, i.e. values above 65,504 that float16 cannot hold."""
    cause = f" (float16 overflows above {FP16_MAX:,.0f}: drop --dstore-fp16)" if overflow else ""
    return (f"{where}: the keys of {name_entries(ids, count)} ({count:,} {scope}) are not finite "
            f"(NaN or inf){cause}; {fix}")


def first_outside(array, low: int, high: int) -> Optional[Tuple[int, int]]:
    """(position, value) of the first element outside [low, high), or None."""
    for lo, block in scan_rows(array):
        bad = np.flatnonzero((block < low) | (block >= high))
        if len(bad):
            i = int(bad[0])
            return lo + i // max(1, block[0].size if block.ndim > 1 else 1), int(block.reshape(-1)[i])
    return None
