"""Progress output of long index work: log lines and a clock for long FAISS calls."""

import sys
import threading
from typing import Callable

import faiss
from tqdm import tqdm


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def call_with_clock(fn: Callable, desc: str, progress: bool):
    """Run a long FAISS call (which releases the GIL) under a ticking tqdm clock."""
    if not progress:
        return fn()
    result = {}
    threads = faiss.omp_get_max_threads()  # OpenMP settings are per thread

    def target():
        try:
            faiss.omp_set_num_threads(threads)
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr) as clock:
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            clock.refresh()
    if "error" in result:
        raise result["error"]
    return result.get("value")
