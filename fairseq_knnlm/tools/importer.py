"""Import a datastore and FAISS index made by the original kNN-LM code (urvashik/knnlm).

The original's datastore pass writes ``PREFIX_keys.npy`` and ``PREFIX_vals.npy``
as headerless ``np.memmap`` files: keys (N, dim) float32, or float16 with
``--dstore-fp16``; values (N, 1) int64, or int16 with ``--dstore-fp16``, which
wraps around for token ids above 32,767.  It skips the first block of the
split, so entry 0 is the target of some later position of the split.

The import never copies keys: ``meta.json`` references the raw keys file (path,
byte offset, and a digest of sampled rows that the reader re-checks).  Values
are never trusted: entry i must be token ``first_token + i`` of the binarized
split, exactly, or modulo 2^16 for int16 values of a larger vocabulary, which
are then rebuilt from the split.  The store's ``vals.npy`` is written from the
split after these checks.  An original index is adopted, not copied, after its
size, dimension, metric and self-recall are checked.  Nothing is written
before the cheap checks pass, and the store appears (rename of a ``.partial``
directory, ``meta.json`` inside) only after all of them pass.
"""

import os
import sys
import time
import uuid
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..integration import artefacts
from ..integration.keys import check_keytype
from ..storage.datastore import (
    EXTERNAL_KEYS,
    FORMAT_VERSION,
    VALS_DTYPE,
    VALS_FILE,
    VALS_RANGE,
    dictionary_md5,
    sampled_rows_sha256,
)
from ..storage.files import META_FILE, PartialDirectory, check_can_write, file_sha256, write_json_atomic

PROG = "fairseq-knnlm-import"
ORIGINAL = "urvashik/knnlm"
# int16 holds ids up to 32,767; larger ones wrap around modulo 2^16.
INT16_IDS = 1 << 15
# Values compared and written per step of the value pass.
VALUE_CHUNK = 1 << 22


class OriginalImportError(UserError):
    """Artefacts of the original code that cannot be imported as given."""


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def original_files(prefix: str) -> Tuple[str, str]:
    """(keys, values) files the original writes for ``--dstore-mmap PREFIX``."""
    return f"{prefix}_keys.npy", f"{prefix}_vals.npy"


def open_original(prefix: str, size: int, dim: int, fp16: bool) -> Tuple[np.memmap, np.memmap]:
    """The original's keys (size, dim) and values (size,) as read-only memory maps,
    after checking that the files hold exactly that many entries."""
    if size < 1 or dim < 1:
        raise OriginalImportError(f"--dstore-size and --dim must be positive, got {size} and {dim}")
    keys_path, vals_path = original_files(os.path.abspath(prefix))
    for path in (keys_path, vals_path):
        if not os.path.isfile(path):
            raise OriginalImportError(
                f"no {path}; --dstore-filename is the prefix the original wrote PREFIX_keys.npy "
                "and PREFIX_vals.npy with"
            )
    keys_dtype = np.dtype(np.float16 if fp16 else np.float32)
    vals_dtype = np.dtype(np.int16 if fp16 else np.int64)
    flag = "--dstore-fp16" if fp16 else "no --dstore-fp16"
    row_bytes = dim * keys_dtype.itemsize
    keys_bytes = os.path.getsize(keys_path)
    if keys_bytes % row_bytes:
        hint = ""
        if keys_bytes % (size * keys_dtype.itemsize) == 0:
            hint = f" (with --dstore-size {size} its rows would be {keys_bytes // (size * keys_dtype.itemsize)}-dim)"
        raise OriginalImportError(
            f"{keys_path} ({keys_bytes:,} bytes) is not a whole number of {dim}-dim {keys_dtype.name} "
            f"keys{hint}; check --dim and --dstore-fp16"
        )
    if keys_bytes // row_bytes != size:
        hint = ""
        if keys_bytes == size * dim * (6 - keys_dtype.itemsize):  # the other key dtype fits exactly
            hint = f" (it holds {size:,} {'float32' if fp16 else 'float16'} keys: {'drop' if fp16 else 'pass'} --dstore-fp16)"
        raise OriginalImportError(
            f"{keys_path} holds {keys_bytes // row_bytes:,} {dim}-dim {keys_dtype.name} keys, not "
            f"--dstore-size {size:,}{hint}; pass the --dstore-size, --dim and --dstore-fp16 the original used"
        )
    vals_bytes = os.path.getsize(vals_path)
    if vals_bytes != size * vals_dtype.itemsize:
        raise OriginalImportError(
            f"{vals_path} holds {vals_bytes:,} bytes, not {size:,} {vals_dtype.name} values (what the "
            f"original writes with {flag}); check --dstore-size and --dstore-fp16"
        )
    keys = np.memmap(keys_path, dtype=keys_dtype, mode="r", shape=(size, dim))
    vals = np.memmap(vals_path, dtype=vals_dtype, mode="r", shape=(size,))
    return keys, vals


def entries_start(n_tokens: int, size: int, first_token: Optional[int]) -> int:
    """Position in the split of entry 0's token.  The original skips the split's
    first block, so by default the entries are the split's last ``size`` tokens."""
    start = n_tokens - size if first_token is None else int(first_token)
    if start < 0 or start + size > n_tokens:
        raise OriginalImportError(
            f"{size:,} entries from token {start:,} do not fit in the split's {n_tokens:,} tokens; "
            "check --dstore-size, --gen-subset and --first-token"
        )
    return start


def _check_range(vals: np.ndarray, dict_size: int, path: str, progress: bool) -> None:
    """Every stored value must be a token id of the dictionary."""
    with tqdm(total=len(vals), desc="values: range", unit="values", unit_scale=True,
              disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, len(vals), VALUE_CHUNK):
            chunk = np.asarray(vals[lo : lo + VALUE_CHUNK])
            bad = np.flatnonzero((chunk < 0) | (chunk >= dict_size))
            if len(bad):
                i = lo + int(bad[0])
                raise OriginalImportError(
                    f"{path} entry {i:,} holds {int(vals[i])}, outside the dictionary of {dict_size:,} "
                    "types: the values were made with another dictionary; pass the model's data-bin"
                )
            bar.update(len(chunk))


def check_and_write_values(stored: np.ndarray, tokens: np.ndarray, start: int, dict_size: int,
                           vals_path: str, out: PartialDirectory, progress: bool = True) -> Dict:
    """Check the original's values against the split and write ours (int32) from the split.

    int64 values, and int16 values of a vocabulary that fits int16, must equal
    the split's tokens ``start, start+1, ...`` exactly.  int16 values of a larger
    vocabulary cannot be trusted (ids above 32,767 wrapped around): they must
    equal the split's tokens modulo 2^16, and the split's tokens replace them.
    Returns {"wrong": stored values that differ from the split's tokens,
    "rebuilt": whether values were taken from the split because of overflow,
    "range": [smallest, largest] value written}.
    """
    size = len(stored)
    rebuild = stored.dtype == np.int16 and dict_size > INT16_IDS
    if not rebuild:
        _check_range(stored, dict_size, vals_path, progress)
    mismatched, first_bad, wrong, lo_hi = 0, None, 0, [None, None]
    out.stream(VALS_FILE, VALS_DTYPE)
    with tqdm(
        total=size, desc="values: check against the split", unit="values", unit_scale=True,
        disable=not progress, file=sys.stderr,
    ) as bar:
        for lo in range(0, size, VALUE_CHUNK):
            hi = min(lo + VALUE_CHUNK, size)
            expected = np.asarray(tokens[start + lo : start + hi]).astype(np.int64)
            if expected.max() >= dict_size:
                raise OriginalImportError(
                    f"the split holds token ids up to {int(expected.max())} but the dictionary has "
                    f"{dict_size:,} types: it was binarized with another dictionary"
                )
            got = np.asarray(stored[lo:hi])
            comparable = expected.astype(np.int16) if rebuild else expected
            bad = np.flatnonzero(comparable != got)
            if len(bad) and first_bad is None:
                first_bad = lo + int(bad[0])
            mismatched += len(bad)
            wrong += int(np.count_nonzero(expected != got))
            out.append(VALS_FILE, expected.astype(VALS_DTYPE))
            lo_hi = [int(expected.min()) if lo_hi[0] is None else min(lo_hi[0], int(expected.min())),
                     int(expected.max()) if lo_hi[1] is None else max(lo_hi[1], int(expected.max()))]
            bar.update(hi - lo)
    if mismatched:
        i = first_bad
        how = " even modulo 2^16" if rebuild else ""
        raise OriginalImportError(
            f"{vals_path} disagrees{how} with the split at {mismatched:,} of {size:,} entries (first: "
            f"entry {i:,} holds {int(stored[i])}, the split's token {start + i:,} is {int(tokens[start + i])}): "
            f"it was not made from this split starting at token {start:,}; check DATA, --gen-subset, "
            "--first-token and --dstore-size"
        )
    return dict(wrong=wrong, rebuilt=bool(rebuild), range=lo_hi)


def values_report(checked: Dict, size: int, stored_dtype, source: str) -> str:
    if checked["rebuilt"]:
        return (
            f"values: {checked['wrong']:,} of {size:,} {np.dtype(stored_dtype).name} values were wrong "
            f"(token ids above {INT16_IDS - 1:,} overflowed); all rebuilt from {source}, which the "
            "stored values match modulo 2^16"
        )
    return f"values: all {size:,} match {source}"


def import_original(
    prefix: str,
    size: int,
    dim: int,
    fp16: bool,
    checkpoint: str,
    data: str,
    output: str,
    split: str = "train",
    keytype: str = "last_ffn_input",
    first_token: Optional[int] = None,
    index_file: Optional[str] = None,
    nprobe: int = 32,
    self_recall_queries: int = 1000,
    self_recall_k: int = 1024,
    min_self_recall: float = 0.95,
    seed: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _log,
) -> Dict:
    """Import the original's ``PREFIX_keys.npy``/``PREFIX_vals.npy`` (and index) as
    a datastore at ``output``; returns its metadata (with ``index`` when adopted)."""
    from ..index.adopt import adopt_index, read_foreign_index
    from ..index.files import INDEX_FILE, meta_path
    from ..index.recall import format_self_recall, self_recall

    started = time.monotonic()
    check_keytype(keytype)
    if not 0 <= min_self_recall <= 1:
        raise OriginalImportError(f"--min-self-recall must be between 0 and 1, got {min_self_recall}")
    if self_recall_queries < 1 or self_recall_k < 1 or nprobe < 1:
        raise OriginalImportError("--self-recall-queries, --self-recall-k and --probe must be at least 1")
    output = os.path.abspath(os.fspath(output).rstrip("/"))
    data = os.path.abspath(data)
    checkpoint = os.path.abspath(checkpoint)
    keys, stored = open_original(prefix, size, dim, fp16)
    sources = [keys.filename, stored.filename] + ([os.path.abspath(index_file)] if index_file else [])
    for path in sources:
        if os.path.realpath(path).startswith(os.path.realpath(output) + os.sep):
            raise OriginalImportError(
                f"{path} lies inside --dstore {output}, which the import creates; choose another --dstore"
            )
    check_can_write(output, overwrite, what="datastore", option="--dstore", overwrite_flag="--dstore-overwrite",
                    error=OriginalImportError)
    dictionary = artefacts.load_dictionary(
        os.path.join(data, "dict.txt"), OriginalImportError, "pass the data-bin directory the model was trained with")
    tokens = artefacts.split_tokens(data, split, OriginalImportError)
    start = entries_start(len(tokens), size, first_token)
    if index_file:
        index, metric = read_foreign_index(index_file, size, dim)
    model_dim = artefacts.model_key_dim(checkpoint, data, keytype, OriginalImportError)
    if model_dim != dim:
        raise OriginalImportError(
            f"the model's {keytype} keys have dimension {model_dim}, not --dim {dim}; pass the model "
            "the datastore was made with (or the right --knn-keytype)"
        )
    log(f"importing {size:,} entries of {dim}-dim {keys.dtype.name} keys from {prefix}_*.npy "
        f"(entries start at token {start:,} of {split}, {len(tokens):,} tokens) -> {output}")

    out = PartialDirectory(output)
    partial = out.path
    try:
        source = f"{os.path.join(data, split)} from token {start:,}"
        checked = check_and_write_values(stored, tokens, start, len(dictionary), stored.filename,
                                         out, progress)
        out.finish_arrays()  # the store is opened (to adopt the index) before it is committed
        log(values_report(checked, size, stored.dtype, source))
        recall = None
        if index_file:
            t0 = time.monotonic()
            recall = self_recall(index, keys, self_recall_queries, self_recall_k, nprobe, seed, progress)
            recall["seconds"] = round(time.monotonic() - t0, 3)
            log(format_self_recall(recall))
            if recall["at_k"] < min_self_recall:
                raise OriginalImportError(
                    f"index {index_file} does not find this store's keys (self-recall {recall['at_k']:.4f} "
                    f"< --min-self-recall {min_self_recall}): it is an index of another store, or its ids "
                    "are not positions in it; give its own --indexfile or leave it out and build one "
                    "with fairseq-knnlm-build-index"
                )
        meta = dict(
            checkpoint=checkpoint,
            checkpoint_sha256=file_sha256(checkpoint),
            data=data,
            split=split,
            dictionary_size=len(dictionary),
            dictionary_md5=dictionary_md5(dictionary),
            keytype=keytype,
            sample_break_mode="none",
            shard_id=0,
            num_shards=1,
            first_sample_id=0,
            first_token=start,
            format_version=FORMAT_VERSION,
            id=uuid.uuid4().hex,
            size=size,
            dim=dim,
            keys_dtype=keys.dtype.name,
            vals_dtype=np.dtype(VALS_DTYPE).name,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            imported_from=dict(
                code=ORIGINAL, keys=keys.filename, vals=stored.filename, vals_dtype=stored.dtype.name,
                vals_wrong=checked["wrong"], vals_rebuilt=checked["rebuilt"],
                index=os.path.abspath(index_file) if index_file else None,
            ),
        )
        meta[EXTERNAL_KEYS] = dict(path=keys.filename, offset=0, sampled_rows_sha256=sampled_rows_sha256(keys))
        meta[VALS_RANGE] = checked["range"]
        if index_file:
            # Adopted inside the partial store, so that store and index appear together.
            write_json_atomic(os.path.join(partial, META_FILE), meta)
            meta["index"] = adopt_index(index_file, partial, index, metric, recall,
                                        output=os.path.join(partial, INDEX_FILE))
            meta["index"]["datastore_path"] = output
            write_json_atomic(meta_path(os.path.join(partial, INDEX_FILE)), meta["index"])
        out.commit({k: v for k, v in meta.items() if k != "index"})
    except BaseException:
        out.abort()
        raise
    log(f"wrote datastore {output} ({META_FILE} references {keys.filename}; no keys copied)")
    if index_file:
        log(f"adopted {index_file} as {os.path.join(output, INDEX_FILE)} (a link) with its metadata")
    meta["seconds"] = round(time.monotonic() - started, 3)
    return meta
