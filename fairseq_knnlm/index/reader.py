"""Reading a datastore's keys for FAISS: float32 rows, checked finite, without
keeping file pages resident; and the seeded samples of rows that training and
recall read."""

import mmap
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..storage.datastore import RowConcat
from ..storage.validate import NAMED_ENTRIES, nonfinite_keys_message, nonfinite_rows
from .errors import IndexBuildError

# Bytes of key pages resident at once while reading scattered keys.
GATHER_BYTES = 64 << 20


def sample_ids(size: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct positions of ``size``, sorted (sequential reads), drawn with ``seed``."""
    return np.sort(np.random.default_rng(seed).choice(size, n, replace=False))


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
