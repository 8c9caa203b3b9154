"""Documented import path kept for users' code: saved neighbours live in ``storage.neighbors``."""

from .storage.neighbors import Neighbors, NeighborsError, NeighborsWriter, read_neighbors  # noqa: F401
