"""Indexes on GPUs: the check that there are any, and the one way to copy an index there."""

from typing import Optional, Sequence

import faiss

from ..errors import first_line
from .errors import IndexBuildError
from .factory import ivf_of


def check_gpu() -> int:
    """The number of GPUs FAISS sees; IndexBuildError when it has no GPU support or sees none."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise IndexBuildError(
            "this faiss has no GPU support; install a GPU build (FAISS=gpu bash "
            "scripts/install.sh, i.e. faiss-gpu-cu12) or drop --gpu"
        )
    ngpu = faiss.get_num_gpus()
    if ngpu < 1:
        raise IndexBuildError("faiss sees no GPU (check CUDA_VISIBLE_DEVICES) ; drop --gpu")
    return ngpu


def to_gpus(index: faiss.Index, devices: Optional[Sequence[int]] = None, shard: bool = False) -> faiss.Index:
    """A copy of ``index`` on ``devices`` (default: all visible GPUs); on
    several, replicated, or split among them with ``shard``."""
    devices = list(range(check_gpu()) if devices is None else devices)
    resources = [faiss.StandardGpuResources() for _ in devices]
    co = faiss.GpuMultipleClonerOptions()
    # GPU IVF-PQ needs float16 lookup tables for large codes; for flat
    # storage the option would round the vectors, so it stays off there.
    co.useFloat16 = isinstance(ivf_of(index), faiss.IndexIVFPQ)
    co.shard = shard
    try:
        gpu_index = faiss.index_cpu_to_gpu_multiple_py(resources, index, co, devices)
    except RuntimeError as e:
        where = f"GPU {devices[0]}" if len(devices) == 1 else "GPUs"
        raise IndexBuildError(f"FAISS cannot put this index on {where} ({first_line(e)}); use it on the CPU") from None
    gpu_index.referenced_objects = resources  # the resources must outlive the index
    return gpu_index


def flat_on_gpus(dim: int, metric_type: int) -> faiss.Index:
    """An empty exact flat index of ``dim`` and FAISS metric ``metric_type`` on all GPUs."""
    return to_gpus(faiss.IndexFlat(dim, metric_type))
