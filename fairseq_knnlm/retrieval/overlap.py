"""--knn-overlap: search one batch while the model computes the next.

FAISS releases the GIL while it searches, so a single worker thread can run
batch i's search step while the calling thread runs batch i+1's forward pass
(on a GPU machine the LM runs on the GPU meanwhile; the code is the same).

* :class:`Lookahead` iterates eval-lm's batches one ahead, so that the scorer
  can see the batch that comes next (``peek``).
* :class:`SearchOverlap` runs ``search(prepare(batch))`` for each batch,
  with the *next* batch's ``prepare`` done while the search runs, and keeps
  that prepared batch for the next call.

Results are those of the sequential path: every batch is prepared and
searched by the same functions, searches run one at a time and in batch order
(one worker), and the worker uses the calling thread's FAISS and torch thread
counts (OpenMP settings are per thread; reductions split over a different
number of threads could round differently).
"""

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Hashable, Iterable, Optional


_END = object()


class Lookahead:
    """Iterates like ``items`` (and has its length), fetching one item ahead:
    while an item is being used, :meth:`peek` returns the item after it."""

    def __init__(self, items: Iterable):
        self.items = items
        self._next = _END

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        it = iter(self.items)
        self._next = next(it, _END)
        while self._next is not _END:
            item, self._next = self._next, next(it, _END)
            yield item

    def peek(self) -> Optional[Any]:
        """The item after the one last yielded, or None at the end."""
        return None if self._next is _END else self._next


class SearchOverlap:
    """Runs each batch's search step on one worker thread while the caller
    prepares the next batch.

    ``peek()`` returns the batch that will come after the current one (or
    None); ``key(batch)`` identifies a batch, so that a prepared batch is only
    used for the batch it was prepared from; ``thread_init`` runs once in the
    worker thread (thread counts: :func:`search_params.thread_setter`).
    """

    def __init__(self, peek: Callable[[], Any], key: Callable[[Any], Hashable],
                 thread_init: Optional[Callable[[], None]] = None):
        self.peek = peek
        self.key = key
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="knn-search", initializer=thread_init
        )
        self._ready = None  # (key, prepared) of the next batch
        self.prepared_ahead = 0  # batches whose preparation overlapped a search

    def run(self, batch, prepare: Callable[[Any], Any], search: Callable[[Any], Any],
            ready: Callable[[Any], bool] = lambda batch: True):
        """(prepare(batch), search(prepare(batch))), the next batch prepared meanwhile.

        ``ready(next_batch)`` says whether the next batch can be prepared
        ahead (eval-lm skips batches without input).
        """
        prepared = self._take(batch)
        if prepared is None:
            prepared = prepare(batch)
        future = self._executor.submit(search, prepared)
        upcoming = self.peek()
        try:
            if upcoming is not None and ready(upcoming):
                self._ready = (self.key(upcoming), prepare(upcoming))
                self.prepared_ahead += 1
        finally:
            wait([future])  # never leave a search running behind an error
        return prepared, future.result()

    def _take(self, batch):
        ready, self._ready = self._ready, None
        if ready is not None and ready[0] == self.key(batch):
            return ready[1]
        return None

    def close(self) -> None:
        self._ready = None
        self._executor.shutdown(wait=True)
