"""Thread settings for the sweep's torch work."""

import contextlib

import torch


@contextlib.contextmanager
def single_torch_thread():
    """Run torch ops on the calling thread only.

    The sweep's tensors are small or processed chunk-per-thread; intra-op
    threads would only add synchronisation, which costs many times the work
    on a busy machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_threads() -> int:
    return max(1, min(4, torch.get_num_threads()))


def run_in_chunks(job, spans, threads=None, progress=False, desc="chunks") -> None:
    """``job(span)`` for every span, in ``threads`` parallel threads (default:
    :func:`default_threads`), each single-threaded in torch: one thread per
    chunk rather than per op, so nothing synchronises inside a chunk."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    threads = max(1, min(threads or default_threads(), len(spans) or 1))
    with tqdm(total=len(spans), desc=desc, unit="chunk", leave=False, disable=None if progress else True) as bar, \
            torch.no_grad(), single_torch_thread():
        if threads == 1:
            for span in spans:
                job(span)
                bar.update()
        else:
            with ThreadPoolExecutor(threads) as pool:
                for _ in pool.map(job, spans):
                    bar.update()
