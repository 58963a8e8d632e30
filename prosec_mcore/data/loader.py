"""Batches assembled off the training loop: worker processes or a thread, ahead of the step.

The training loop asks for iteration k's micro-batches (data/batches.py) and should never wait
for them. :class:`BatchLoader` builds them ahead of time, in order:

* ``num_workers = 0, prefetch = 0``: in the loop, when asked (what the tests of the exact
  batches and a debugger want);
* ``num_workers = 0, prefetch = P``: one background thread keeps up to P iterations ready.
  Reading an indexed dataset or decoding a shard is mostly memory copies and numpy work that
  releases the GIL, so a thread already hides most of the latency;
* ``num_workers = W``: a ``torch.utils.data.DataLoader`` with W worker processes over the
  micro-batches ``(k, j)`` in order (a map-style dataset indexed by ``k * C + j``), keeping
  ``prefetch`` iterations in flight. torch's loader returns results in index order whatever worker
  finished first, so the stream is the same for every W.

Why this is exact on resume: a micro-batch is a pure function of ``(iteration, index)`` (its
samples' global indices, and through them the data and the diffusion noise), so a loader started
at iteration k yields what an uninterrupted run's loader yields at k. Nothing of the loader's own
state (threads, worker queues, prefetched batches) has to be saved; what the checkpoint records
is the data's identity and position (see ``data_state``), to tell a resume that the data changed.

``wait_s`` is the time the last ``next()`` blocked the training loop: the trainer logs it as
``data_wait_s`` so that a run shows whether it is ever data-bound.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional

import torch

from .batches import GlobalBatchIterator


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``i`` = micro-batch ``i % C`` of iteration ``start + i // C`` (map-style, so
    that torch's DataLoader hands indices to its workers and returns results in order)."""

    def __init__(self, batches: GlobalBatchIterator, start_iteration: int, end_iteration: int):
        self.batches = batches
        self.start = start_iteration
        self.count = (end_iteration - start_iteration) * batches.num_microbatches

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        per = self.batches.num_microbatches
        return self.batches.microbatch(self.start + i // per, i % per)


def describe_loading(num_workers: int, prefetch: int) -> str:
    """How batches are assembled, for the start-up log."""
    if num_workers:
        return f"by {num_workers} worker processes, {max(prefetch, 1)} iteration(s) ahead"
    if prefetch:
        return f"by a background thread, {prefetch} iteration(s) ahead"
    return "in the training loop (data.prefetch=0)"


def _worker_init(_worker_id: int) -> None:
    # each worker is a process of its own: one thread each keeps W workers on W cores
    torch.set_num_threads(1)


class BatchLoader:
    """This rank's micro-batches, one iteration at a time, from ``start_iteration`` (0-based batch
    index) to ``end_iteration`` (exclusive); ``next(loader)`` returns ``(index, [micro-batches])``."""

    def __init__(self, batches: GlobalBatchIterator, start_iteration: int, end_iteration: int,
                 num_workers: int = 0, prefetch: int = 2):
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"data.num_workers and data.prefetch must be >= 0 (got {num_workers}, {prefetch})")
        self.batches = batches
        self.next_index = start_iteration
        self.end = end_iteration
        self.num_workers, self.prefetch = num_workers, prefetch
        self.wait_s = 0.0
        self._per = batches.num_microbatches
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._queue: Optional[queue.Queue] = None
        self._workers = None
        if start_iteration >= end_iteration:
            return
        if num_workers > 0:
            items = _MicroBatches(batches, start_iteration, end_iteration)
            # prefetch counts iterations; torch counts micro-batches per worker
            per_worker = max(1, -(-max(prefetch, 1) * self._per // num_workers))
            self._workers = iter(torch.utils.data.DataLoader(
                items, batch_size=None, shuffle=False, num_workers=num_workers, prefetch_factor=per_worker,
                worker_init_fn=_worker_init, persistent_workers=False))
        elif prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, name="prosec-batch-prefetch", daemon=True)
            self._thread.start()


    def _produce(self) -> None:
        index = self.next_index
        while index < self.end and not self._stop.is_set():
            try:
                item = (index, self.batches.microbatches(index))
            except BaseException as err:  # handed to the training loop, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            index += 1

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[int, list]:
        if self.next_index >= self.end:
            raise StopIteration
        begin = time.perf_counter()
        if self._workers is not None:
            micro = [next(self._workers) for _ in range(self._per)]
            item = (self.next_index, micro)
        elif self._queue is not None:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
        else:
            item = (self.next_index, self.batches.microbatches(self.next_index))
        self.wait_s = time.perf_counter() - begin
        if item[0] != self.next_index:  # cannot happen: the producers run in order
            raise RuntimeError(f"batch loader out of order: got {item[0]}, expected {self.next_index}")
        self.next_index += 1
        return item

    def close(self) -> None:
        """Stop the thread or the worker processes (also safe to call twice)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.1)
            self._thread = None
        self._workers = None  # torch's loader iterator stops its worker processes when collected
