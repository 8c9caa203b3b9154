"""Crash-safe output directories, shared by every writer of artefacts.

A writer streams its arrays as ``.npy`` files into ``<final>.partial/``
behind a fixed-size header that is rewritten with the final shape once the
row count is known, fsyncs them, writes ``meta.json`` last and renames the
directory into place; a directory without ``meta.json`` is never accepted,
and the next writer replaces a leftover ``.partial``.
"""

import hashlib
import json
import os
import shutil
import struct
from typing import Dict, Tuple

import numpy as np

from ..errors import UserError

META_FILE = "meta.json"
PARTIAL_SUFFIX = ".partial"
# Arrays are streamed behind a fixed-size .npy header that is rewritten with
# the final shape once the count is known.
NPY_HEADER_BYTES = 128


def npy_header(dtype, shape) -> bytes:
    """A version 1.0 .npy header padded to exactly NPY_HEADER_BYTES."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(int(s) for s in shape),
    }
    body = repr(header).encode("latin1")
    room = NPY_HEADER_BYTES - 10  # magic (8) + header length (2)
    if len(body) + 1 > room:
        raise UserError(f"shape {shape} does not fit a .npy header")
    return (
        np.lib.format.magic(1, 0)
        + struct.pack("<H", room)
        + body.ljust(room - 1)
        + b"\n"
    )


def file_sha256(path: str, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_directory(partial_dir: str, final_dir: str, meta: Dict) -> str:
    """Write meta.json last, then move ``partial_dir`` into place at ``final_dir``
    (replacing an existing one only after the new one is complete)."""
    write_json_atomic(os.path.join(partial_dir, META_FILE), meta)
    if os.path.exists(final_dir):
        old = final_dir + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final_dir, old)
        os.rename(partial_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.rename(partial_dir, final_dir)
    return final_dir


def check_can_write(final_dir: str, overwrite: bool, what: str, option: str, overwrite_flag: str, error) -> None:
    """Refuse, before any work is done, to clobber a finished output directory
    (one with meta.json) or to write where we can't."""
    final_dir = os.path.abspath(os.fspath(final_dir).rstrip("/"))
    complete = os.path.exists(os.path.join(final_dir, META_FILE))
    if complete and not overwrite:
        raise error(
            f"{final_dir} already holds a complete {what}; pass {overwrite_flag} to replace it "
            f"or choose another {option}"
        )
    if os.path.exists(final_dir) and not os.path.isdir(final_dir):
        raise error(f"{final_dir} exists and is not a directory; choose another {option}")
    if os.path.isdir(final_dir) and os.listdir(final_dir) and not complete and not overwrite:
        raise error(
            f"{final_dir} is not empty and is not a {what}; choose another {option} "
            f"or pass {overwrite_flag}"
        )
    parent = os.path.dirname(final_dir) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write to {parent}; choose a writable {option}")


class PartialDirectory:
    """A set of ``.npy`` arrays streamed into ``<final_dir>.partial/``.

    :meth:`stream` opens an array of a dtype and row shape; :meth:`append`
    adds rows to it.  Nothing lands at ``final_dir`` until :meth:`commit`,
    which rewrites every header with the rows written, fsyncs, writes
    ``meta.json`` last and renames the directory into place; :meth:`abort`
    drops everything.  Other files may be put in :attr:`path` before the commit.
    """

    def __init__(self, final_dir: str):
        self.final_dir = os.path.abspath(os.fspath(final_dir).rstrip("/"))
        self.path = self.final_dir + PARTIAL_SUFFIX
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.makedirs(self.path)
        self._arrays: Dict[str, Tuple] = {}  # name -> [file, dtype, row shape, rows]

    def stream(self, name: str, dtype, row_shape: Tuple[int, ...] = ()) -> None:
        f = open(os.path.join(self.path, name), "wb")
        f.write(npy_header(dtype, (0,) + tuple(row_shape)))
        self._arrays[name] = [f, np.dtype(dtype), tuple(row_shape), 0]

    def append(self, name: str, rows: np.ndarray) -> None:
        """Add ``rows`` (already of the stream's dtype and row shape) to array ``name``."""
        entry = self._arrays[name]
        entry[0].write(np.ascontiguousarray(rows, dtype=entry[1]).tobytes())
        entry[3] += len(rows)

    def rows(self, name: str) -> int:
        return self._arrays[name][3]

    def write_array(self, name: str, array: np.ndarray) -> None:
        """A whole array at once (fsynced), e.g. one known only at the end."""
        with open(os.path.join(self.path, name), "wb") as f:
            f.write(npy_header(array.dtype, array.shape))
            f.write(np.ascontiguousarray(array).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def finish_arrays(self) -> None:
        """Rewrite each streamed array's header with its final shape, fsync, close."""
        for f, dtype, row_shape, rows in self._arrays.values():
            if f.closed:
                continue
            f.seek(0)
            f.write(npy_header(dtype, (rows,) + row_shape))
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def commit(self, meta: Dict) -> str:
        """Finish the arrays, write meta.json last, move into place; returns ``final_dir``."""
        self.finish_arrays()
        return commit_directory(self.path, self.final_dir, meta)

    def abort(self) -> None:
        for f, *_ in self._arrays.values():
            if not f.closed:
                f.close()
        shutil.rmtree(self.path, ignore_errors=True)
