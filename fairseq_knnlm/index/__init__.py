"""The FAISS index over a datastore's keys: choice, build, pieces, loading, search parameters."""

from .core import (  # noqa: F401
    INDEX_FILE,
    IndexBuildError,
    IndexMismatchError,
    KeyReader,
    build_index,
    default_factory,
    default_index_path,
    evaluate_recall,
    load_index,
    make_index,
    meta_path,
    partial_paths,
)
from .shards import add_shard, find_shards, merge_shards, open_index, train_only  # noqa: F401
