"""Opening an index for search: a whole or merged index file checked against
its datastore, or a directory of index shards searched in place."""

import os
from typing import Dict, Optional, Sequence, Tuple

import faiss

from ..errors import UserError
from .errors import PROG, IndexMismatchError
from .factory import nprobe_of, set_nprobe
from .files import check_index_matches, check_ondisk_data, open_datastore, read_checked, read_flags, read_index_meta
from .gpu import to_gpus
from .search_params import apply_faiss_params
from .shards import load_index_shards


def load_index(
    index_path: str, datastore, nprobe: Optional[int] = None, gpu: bool = False,
    faiss_params: Optional[str] = None, mmap: bool = False,
) -> Tuple[faiss.Index, Dict]:
    """(index, metadata) of a complete index checked against ``datastore``.

    Sets ``nprobe`` on the IVF (inside any wrapper; None keeps the nprobe saved
    in the index file) and ``faiss_params`` (``--knn-faiss-params``, FAISS
    ParameterSpace syntax); ``gpu`` then copies the index to all visible GPUs
    (sharded).  ``mmap``: see :func:`~.files.read_flags`.  The metadata gains ``path``, and
    ``nprobe`` is the one searched with (None without an IVF).
    """
    ds = open_datastore(datastore)
    index_path = os.path.abspath(str(index_path))
    meta = read_index_meta(index_path)
    check_index_matches(meta, ds, index_path)
    if "index_bytes" in meta and os.path.getsize(index_path) != meta["index_bytes"]:
        raise IndexMismatchError(
            f"index {index_path} ({meta.get('adopted_from')}) changed since it was adopted; "
            "rerun fairseq-knnlm-import with --indexfile"
        )
    check_ondisk_data(index_path, meta)
    index = read_checked(index_path, read_flags(mmap), meta, ds)
    if index.ntotal != ds.size:
        raise IndexMismatchError(
            f"index {index_path} holds {index.ntotal} keys, its metadata and datastore "
            f"{ds.path} say {ds.size}; rebuild it with {PROG} --dstore {ds.path} --overwrite"
        )
    set_nprobe(index, nprobe)
    apply_faiss_params(index, faiss_params)
    searched_nprobe = nprobe_of(index)
    if gpu:
        index = to_gpus(index, shard=True)
    return index, dict(meta, path=index_path, nprobe=searched_nprobe)


def open_index(index_path: str, datastore, nprobe: Optional[int] = None, gpu: bool = False,
               faiss_params: Optional[str] = None, mmap: bool = False,
               shard_ids: Optional[Sequence[int]] = None) -> Tuple[faiss.Index, Dict]:
    """The index ``--knn-index`` names: a whole or merged index file, or a
    directory of index shards (all of them, or ``shard_ids``).  ``nprobe``
    None keeps the nprobe saved in the index files."""
    if os.path.isdir(str(index_path)):
        return load_index_shards(index_path, datastore, shard_ids, nprobe, faiss_params, mmap, gpu)
    if shard_ids is not None:
        raise UserError(
            f"--knn-distributed-index needs --knn-index to be a directory of index shards, "
            f"not the single file {index_path}"
        )
    return load_index(index_path, datastore, nprobe=nprobe, gpu=gpu, faiss_params=faiss_params, mmap=mmap)
