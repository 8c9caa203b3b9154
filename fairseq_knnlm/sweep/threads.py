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
