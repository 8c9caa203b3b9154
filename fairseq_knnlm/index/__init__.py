"""The FAISS index over a datastore's keys: choice, build, pieces, loading, search parameters."""

from .adopt import adopt_index, read_foreign_index  # noqa: F401
from .build import build_index  # noqa: F401
from .errors import IndexBuildError, IndexMismatchError  # noqa: F401
from .factory import default_factory, make_index  # noqa: F401
from .files import INDEX_FILE, default_index_path, meta_path, partial_paths  # noqa: F401
from .load import load_index, open_index  # noqa: F401
from .reader import KeyReader, sample_ids  # noqa: F401
from .recall import evaluate_recall, self_recall  # noqa: F401
from .shards import add_shard, find_shards, merge_shards, train_only  # noqa: F401
