"""Which FAISS index: the paper's default scaled to the store, index_factory, and
the IVF inside any wrapper (nprobe, names)."""

from typing import Iterator, Optional, Tuple

import faiss

from ..errors import first_line
from .errors import IndexBuildError

# The paper's index: 4096 centroids, 64-byte PQ codes with 8-bit sub-quantizers.
DEFAULT_NLIST = 4096
DEFAULT_PQ_BYTES = 64
PQ_CENTROIDS = 256
# FAISS warns when k-means gets fewer than 39 training points per centroid.
MIN_POINTS_PER_CENTROID = 39
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
METRIC_NAMES = {v: k for k, v in METRICS.items()}


def default_factory(n_train: int, dim: int) -> Tuple[str, Optional[str]]:
    """The paper's ``IVF4096,PQ64``, scaled down to what ``n_train`` keys can train.

    Returns (factory, note); note says what was adapted and why, or is None.
    """
    paper = f"IVF{DEFAULT_NLIST},PQ{DEFAULT_PQ_BYTES}"
    if n_train < MIN_POINTS_PER_CENTROID * PQ_CENTROIDS:
        # Too few keys to train 256 PQ centroids; exact search is cheap anyway.
        return "Flat", (
            f"{n_train} training keys are too few for {paper} (FAISS wants "
            f"{MIN_POINTS_PER_CENTROID} per centroid); using exact search (Flat)"
        )
    notes = []
    nlist = DEFAULT_NLIST
    while nlist > PQ_CENTROIDS and n_train < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    if nlist != DEFAULT_NLIST:
        notes.append(
            f"{nlist} centroids instead of {DEFAULT_NLIST}: {n_train} training keys "
            f"(FAISS wants {MIN_POINTS_PER_CENTROID} per centroid)"
        )
    # PQ splits the key into equal sub-vectors: the code size must divide dim.
    m = max(d for d in range(1, min(DEFAULT_PQ_BYTES, dim) + 1) if dim % d == 0)
    if m != DEFAULT_PQ_BYTES:
        notes.append(f"PQ{m} instead of PQ{DEFAULT_PQ_BYTES}: the code size must divide dim {dim}")
    factory = f"IVF{nlist},PQ{m}"
    return factory, (f"using {factory}: " + "; ".join(notes)) if notes else None


def make_index(dim: int, factory: str, metric: str) -> faiss.Index:
    """``faiss.index_factory``, with FAISS's refusal turned into a one-line error.

    PQ codes skip polysemous training, as in the paper's ``IndexIVFPQ``: the
    factory turns it on, but it only reorders codes for polysemous (Hamming)
    filtering, which kNN-LM does not use; search results are the same and it
    costs seconds per sub-quantizer, most of the training time.
    """
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        raise IndexBuildError(
            f"FAISS rejects --index-factory {factory!r} for {dim}-dim keys "
            f"({first_line(e)}); see the FAISS wiki page 'The index factory'"
        ) from None
    for part in layers(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    return index


def layers(index: faiss.Index) -> Iterator[faiss.Index]:
    """``index`` and the indexes it wraps: pre-transforms (OPQ, PCA), refine, ID maps."""
    index = faiss.downcast_index(index)
    yield index
    for name in ("index", "base_index"):
        inner = getattr(index, name, None)
        if isinstance(inner, faiss.Index):
            yield from layers(inner)
            return


def ivf_of(index: faiss.Index):
    """The IVF part of an index (inside pre-transforms), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def set_nprobe(index: faiss.Index, nprobe: Optional[int]) -> None:
    """``nprobe`` on the index's IVF; None keeps the one the index holds (saved with its file)."""
    ivf = ivf_of(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(nprobe)


def nprobe_of(index: faiss.Index) -> Optional[int]:
    """The IVF's nprobe, or None for an index without one."""
    ivf = ivf_of(index)
    return int(ivf.nprobe) if ivf is not None else None


def describe_index(index: faiss.Index) -> str:
    """An index_factory-style name of an index read from disk, e.g. IVF4096,PQ64."""
    ivf = ivf_of(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        nbits = f"x{ivf.pq.nbits}" if ivf.pq.nbits != 8 else ""
        return f"IVF{ivf.nlist},PQ{ivf.pq.M}{nbits}"
    if ivf is not None:
        return f"IVF{ivf.nlist},{type(ivf).__name__}"
    return type(index).__name__  # read_index returns the concrete class
