"""Search-time settings of the kNN search: FAISS parameters, thread counts, re-ranking.

``--knn-faiss-params`` speaks FAISS's own ``ParameterSpace`` syntax
(``"quantizer_efSearch=64,k_factor_rf=4"``) and reaches the parameter's layer
inside any index_factory structure (pre-transforms, refine wrappers, HNSW
coarse quantizers).  Thread counts are OpenMP settings, which are per calling
thread: a worker thread that searches must set its own (:func:`thread_setter`).
"""

from typing import List, Optional, Tuple

import faiss

from ..errors import UserError


class SearchParamsError(UserError):
    pass


def parse_faiss_params(text: str) -> List[Tuple[str, float]]:
    """``"name=value,name=value"`` -> [(name, value)], refusing malformed text in one line."""
    pairs = []
    for item in str(text).split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise SearchParamsError(
                f"--knn-faiss-params {text!r}: cannot read {item.strip()!r}; write name=value pairs "
                "separated by commas, e.g. quantizer_efSearch=64,k_factor_rf=4"
            )
        if name == "nprobe":
            raise SearchParamsError("--knn-faiss-params: give nprobe with --probe, not here")
        pairs.append((name, number))
    return pairs


def tunable_parameters(index: faiss.Index) -> List[str]:
    """The names FAISS's ParameterSpace can tune on ``index`` (nprobe, efSearch, k_factor_rf, ...)."""
    space = faiss.ParameterSpace()
    space.initialize(index)
    return [space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())]


def apply_faiss_params(index: faiss.Index, text: Optional[str]) -> None:
    """Set ``--knn-faiss-params`` on a CPU index; a parameter it has not is a one-line error."""
    if not text:
        return
    space = faiss.ParameterSpace()
    for name, value in parse_faiss_params(text):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            known = ", ".join(tunable_parameters(index)) or "none"
            raise SearchParamsError(
                f"--knn-faiss-params: FAISS cannot set {name!r} on this index "
                f"({type(faiss.downcast_index(index)).__name__}; its tunable parameters: {known})"
            ) from None


def set_threads(faiss_threads: Optional[int], torch_threads: Optional[int]) -> None:
    """Thread counts of this thread's FAISS searches and of torch; None leaves one unchanged."""
    if faiss_threads is not None:
        faiss.omp_set_num_threads(int(faiss_threads))
    if torch_threads is not None:
        import torch  # not at the top: the index builder imports this module without torch

        torch.set_num_threads(int(torch_threads))


def thread_setter():
    """A function that gives the thread calling it this thread's FAISS and torch thread counts.

    torch and FAISS each bring their own OpenMP runtime, and a new thread starts
    with the runtimes' defaults, not with what ``set_threads`` set here.  Equal
    counts also keep results bit-identical: reductions split over threads sum
    in another order.
    """
    import torch

    faiss_threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()

    def apply():
        faiss.omp_set_num_threads(faiss_threads)
        torch.set_num_threads(torch_threads)

    return apply
