"""An index's files: where they live, the sidecar metadata that vouches for
them, atomic writes, and the checks that a file is the one its sidecar describes.

An index lives next to the datastore by default (``DSTORE/knn.index``) with a
sidecar ``knn.index.meta.json`` naming the datastore it was built for.  The
sidecar is written last: an index without one is incomplete.  While keys are
being added, ``<index>.partial`` (the index so far) and
``<index>.partial.json`` (the settings it was built with) are checkpointed so
that an interrupted build continues where it stopped.
"""

import os
from typing import Dict, Tuple

import faiss

from ..errors import first_line
from ..storage.datastore import Datastore
from ..storage.files import fsync_file, write_json_atomic
from ..storage.validate import COUNT, POSITIVE, check_fields, read_json_object
from .errors import PROG, IndexBuildError, IndexMismatchError
from .factory import METRIC_NAMES

FORMAT_VERSION = 1
INDEX_FILE = "knn.index"
META_SUFFIX = ".meta.json"
PARTIAL_SUFFIX = ".partial"
# Sidecar fields that readers rely on (the builder and the import write more).
INDEX_META_FIELDS = dict(datastore_fingerprint=str, ntotal=COUNT, dim=POSITIVE, metric=("l2", "ip"))


def default_index_path(dstore_dir: str) -> str:
    return os.path.join(str(dstore_dir), INDEX_FILE)


def meta_path(index_path: str) -> str:
    return str(index_path) + META_SUFFIX


def partial_paths(index_path: str) -> Tuple[str, str]:
    """(checkpointed index, its build settings) of an unfinished build."""
    partial = str(index_path) + PARTIAL_SUFFIX
    return partial, partial + ".json"


def open_datastore(dstore) -> Datastore:
    """``dstore`` itself if it is an open Datastore, else the one at that path."""
    return dstore if isinstance(dstore, Datastore) else Datastore(str(dstore))


def write_index_atomic(index: faiss.Index, path: str) -> None:
    tmp = path + ".tmp"
    faiss.write_index(index, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)


def remove_files(*paths: str) -> None:
    """Remove ``paths`` and their unfinished ``.tmp`` writes, where they exist."""
    for path in paths:
        for p in (path, path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)


def write_index_with_sidecar(index: faiss.Index, meta: Dict, output: str, record_bytes: bool = False) -> None:
    """Index into place atomically, then the sidecar (last: it marks completion),
    then drop the build's checkpoint.  ``record_bytes``: the sidecar records the
    file's size (``index_bytes``), which readers of pieces check."""
    remove_files(meta_path(output))  # an old sidecar must never vouch for the new index
    write_index_atomic(index, output)
    if record_bytes:
        meta["index_bytes"] = os.path.getsize(output)
    write_json_atomic(meta_path(output), meta)
    remove_files(*partial_paths(output))


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


def read_index_file(path: str, flags: int, fix: str, what: str = "") -> faiss.Index:
    """``faiss.read_index``, with a file FAISS cannot read (cut short, corrupted,
    not an index) turned into a one-line error naming ``what`` and ending with ``fix``."""
    try:
        return faiss.read_index(path, flags)
    except (RuntimeError, MemoryError) as e:  # a damaged length field can ask for any amount of memory
        raise IndexBuildError(f"FAISS cannot read {what}{path} ({first_line(e)}); {fix}") from None


def read_checked(index_path: str, flags: int, meta: Dict, ds: Datastore) -> faiss.Index:
    """The index at ``index_path``; a damaged file or one whose header disagrees
    with its sidecar is a one-line error."""
    rebuild = f"rebuild it with {PROG} --dstore {ds.path} --output {index_path} --overwrite"
    index = read_index_file(index_path, flags, f"the file is truncated or damaged; {rebuild}", what="index ")
    metric = METRIC_NAMES.get(index.metric_type)
    if index.d != meta["dim"] or metric != meta["metric"]:
        raise IndexMismatchError(
            f"index {index_path} holds {index.d}-dim keys with metric {metric or index.metric_type}, its "
            f"metadata says {meta['dim']}-dim {meta['metric']}: the file is damaged or was replaced; {rebuild}")
    return index
