"""Documented import path kept for users' code: the datastore lives in ``storage.datastore``."""

from .storage.datastore import Datastore, DatastoreError, DatastoreWriter, shard_dirname  # noqa: F401
