"""Indexes made elsewhere (e.g. by the original kNN-LM code): read, check, adopt."""

import os
import time
from typing import Dict, Optional, Tuple

import faiss

from ..storage.files import write_json_atomic
from .errors import PROG, IndexBuildError, IndexMismatchError
from .factory import METRIC_NAMES, describe_index, nprobe_of
from .files import FORMAT_VERSION, default_index_path, meta_path, open_datastore, read_index_file, remove_files


def read_foreign_index(path: str, size: int, dim: int) -> Tuple[faiss.Index, str]:
    """(index, metric) of an index made elsewhere (e.g. by the original kNN-LM
    code), checked to hold ``size`` keys of ``dim``.  Inverted lists are
    memory-mapped, not loaded: checking a 100M-key index needs little RAM."""
    path = os.path.abspath(str(path))
    if not os.path.isfile(path):
        raise IndexBuildError(f"no index at {path}; check --indexfile")
    index = read_index_file(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY, "check --indexfile")
    metric = METRIC_NAMES.get(index.metric_type)
    if metric is None:
        raise IndexBuildError(
            f"index {path} uses FAISS metric {index.metric_type}; kNN-LM needs an L2 or inner-product index"
        )
    if index.d != dim or index.ntotal != size:
        raise IndexMismatchError(
            f"index {path} holds {index.ntotal} keys of dim {index.d} but the datastore has "
            f"{size} of dim {dim}: it is an index of another store; give its own --indexfile "
            "or leave it out and build one with " + PROG
        )
    return index, metric


def adopt_index(source: str, datastore, index: faiss.Index, metric: str, recall: Dict,
                output: Optional[str] = None) -> Dict:
    """Make ``source``, an index checked by :func:`read_foreign_index` and
    :func:`~fairseq_knnlm.index.recall.self_recall`, the index of ``datastore``:
    ``output`` (default ``DSTORE/knn.index``) becomes a symbolic link to it (no
    copy), then the sidecar is written, last, as the builder writes it."""
    ds = open_datastore(datastore)
    source = os.path.abspath(str(source))
    output = os.path.abspath(str(output or default_index_path(ds.path)))
    remove_files(meta_path(output))  # an old sidecar must never vouch for the new index
    if output != source:
        link = output + ".tmp"
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(source, link)
        os.replace(link, output)
    meta = dict(
        format_version=FORMAT_VERSION, factory=describe_index(index), metric=metric, dim=ds.dim,
        datastore_fingerprint=ds.fingerprint, datastore_size=ds.size, datastore_path=ds.path,
        ntotal=int(index.ntotal), keys_dtype=str(ds.keys.dtype), nprobe=nprobe_of(index),
        adopted_from=source, index_bytes=os.path.getsize(source), self_recall=recall,
        faiss_version=faiss.__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_json_atomic(meta_path(output), meta)
    return meta
