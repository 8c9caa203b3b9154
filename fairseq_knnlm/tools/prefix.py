"""A datastore of the first N entries of another, without a second pass and without copying keys.

Entries are in corpus order, so the first N entries of a datastore pass are
exactly what a pass over the split's first N tokens would have written (same
model, same context).  The prefix store references the parent's keys in place
(``external_keys``: the parent's ``keys.npy`` past its header, or the file the
parent itself references) and holds only its own ``vals.npy`` (4 bytes an
entry); ``meta.json`` is the parent's, with ``prefix_of`` (parent path,
fingerprint, entries) and the fields of the new store.  Like every writer it
writes ``OUTPUT.partial`` and renames it into place after ``meta.json``.
"""

import os
import time
import uuid
from typing import Dict, Optional

import numpy as np

from ..errors import UserError
from ..storage.datastore import (
    EXTERNAL_KEYS,
    FORMAT_VERSION,
    VALS_DTYPE,
    VALS_FILE,
    VALS_RANGE,
    Datastore,
    sampled_rows_sha256,
)
from ..storage.files import PartialDirectory, check_can_write

PROG = "fairseq-knnlm-prefix"
PREFIX_OF = "prefix_of"
# Fields of the parent's meta.json that describe the parent alone, not its prefix.
OWN_FIELDS = ("id", "size", "created", EXTERNAL_KEYS, VALS_RANGE, PREFIX_OF)


class PrefixError(UserError):
    """A prefix datastore that cannot be made as asked; the message says what to do."""


def prefix_entries(size: int, entries: Optional[int] = None, fraction: Optional[float] = None) -> int:
    """Entries of the prefix: ``entries`` itself, or ``fraction`` of ``size`` rounded to the nearest
    entry; exactly one of them, and 1 to ``size``."""
    if (entries is None) == (fraction is None):
        raise PrefixError("give exactly one of --entries N and --fraction F")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise PrefixError(f"--fraction must be in (0, 1], got {fraction}")
        entries = int(round(fraction * size))
        if entries < 1:
            raise PrefixError(f"--fraction {fraction} of {size:,} entries is no entry; pass a larger --fraction")
    if not 1 <= entries <= size:
        raise PrefixError(f"--entries must be 1 to the store's {size:,} entries, got {entries:,}")
    return entries


def keys_reference(parent: Datastore) -> Dict:
    """Where the parent's keys lie: {"path", "offset", "file_bytes"} of the file holding them."""
    keys = parent.keys  # a memory map of keys.npy past its header, or of the file the parent references
    return dict(path=os.path.abspath(keys.filename), offset=int(keys.offset), file_bytes=os.path.getsize(keys.filename))


def check_parent(parent: Datastore, output: str) -> None:
    """Refuse parents whose first N entries are not one run of one key file, and an output that
    would replace the parent."""
    if parent.meta["num_shards"] > 1:
        first = os.path.join(parent.path, os.path.basename(parent.shards[0].path))
        raise PrefixError(
            f"{parent.path} is sharded ({parent.meta['num_shards']} shards); pass its first shard "
            f"(--dstore {first}) for a prefix within it, or rerun the datastore pass without --num-shards"
        )
    if parent.counts is not None:
        raise PrefixError(
            f"{parent.path} is pruned: its entries are no longer the corpus in order; make the prefix of "
            "the store it was pruned from, then prune the prefix with fairseq-knnlm-prune"
        )
    real_out, real_parent = os.path.realpath(output), os.path.realpath(parent.path)
    if real_out == real_parent or real_parent.startswith(real_out + os.sep):
        raise PrefixError(f"--output {output} would replace the store its keys are read from; choose another --output")


def write_prefix(dstore: str, output: str, entries: Optional[int] = None, fraction: Optional[float] = None,
                 overwrite: bool = False) -> Dict:
    """Write the datastore of the first ``entries`` (or ``fraction``) entries of ``dstore`` at
    ``output``; returns its meta.json."""
    started = time.monotonic()
    output = os.path.abspath(os.fspath(output).rstrip("/"))
    parent = Datastore(dstore)
    check_parent(parent, output)
    n = prefix_entries(parent.size, entries, fraction)
    check_can_write(output, overwrite, what="datastore", option="--output", overwrite_flag="--overwrite",
                    error=PrefixError)
    vals = np.asarray(parent.vals[:n], dtype=VALS_DTYPE)
    meta = {k: v for k, v in parent.shards[0].meta.items() if k not in OWN_FIELDS}
    meta.update(
        format_version=FORMAT_VERSION,
        id=uuid.uuid4().hex,
        size=n,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        prefix_of=dict(path=parent.path, fingerprint=parent.fingerprint, entries=n, parent_entries=parent.size),
    )
    meta[EXTERNAL_KEYS] = dict(keys_reference(parent), sampled_rows_sha256=sampled_rows_sha256(parent.keys[:n]))
    meta[VALS_RANGE] = [int(vals.min()), int(vals.max())]
    out = PartialDirectory(output)
    try:
        out.write_array(VALS_FILE, vals)
        out.commit(meta)
    except BaseException:
        out.abort()
        raise
    return dict(meta, seconds=round(time.monotonic() - started, 3))
