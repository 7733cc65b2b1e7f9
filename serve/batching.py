"""Adaptive batching: a lone request runs at once, requests that arrive during a pass share the next.

Serve's `@serve.batch` (Ray 2.60) either waits `batch_wait_timeout_s` after a batch's first request
for company, which a lone request pays in full, or, with a wait of 0, closes a batch as soon as a
request arrives and queues it behind the running one, so that under load nearly every batch holds
one request. Neither lets the batch size follow the load, so the replica batches here instead.

Per model there is one queue and, while the queue has work, one worker. The worker takes
everything queued (up to `max_batch_size` images), runs one forward pass in a thread so that the
event loop keeps reading and decoding the next requests, and repeats; when the queue is empty it
ends. No timer is ever armed: an idle model starts on the first request, and a busy one collects
the arrivals of one forward pass into the next.

A queue entry is one request's images (a photo's faces), and an entry is never split: its faces
share one forward pass, so a photo's answer never waits for a second pass behind other requests.
An entry larger than `max_batch_size` runs alone in a pass of its own size.
"""

import asyncio
from collections import deque
from typing import Protocol

import numpy as np


class Model(Protocol):
    """What the batcher needs of a model: `emotion.Predictor` is one."""

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


_Pending = tuple[np.ndarray, asyncio.Future]


def _take(queue: deque[_Pending], max_images: int) -> list[_Pending]:
    """The entries at the head of `queue` that fit in `max_images`, and always at least one."""
    taken = [queue.popleft()]
    size = len(taken[0][0])
    while queue and size + len(queue[0][0]) <= max_images:
        size += len(queue[0][0])
        taken.append(queue.popleft())
    return taken


class Batcher:
    """Groups concurrent `predict` calls for the same model object into forward passes.

    Models are keyed by identity, not by name: a request decoded for one loaded checkpoint is
    scored by that checkpoint even if its name has been evicted and loaded again meanwhile.
    `batch_sizes` (images per pass, the most recent) and `failed_in_a_row` are there for /stats and
    the health check.
    """

    def __init__(self, max_batch_size: int, history: int = 1000) -> None:
        self.max_batch_size = max_batch_size
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.failed_in_a_row = 0
        self._queues: dict[int, deque[_Pending]] = {}
        self._workers: set[asyncio.Task] = set()

    async def predict(self, model: Model, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N x classes) for one request's N images (N x H x W x C, N >= 1), computed
        together in one forward pass shared with other requests."""
        if len(pixels) == 0:
            raise ValueError("predict needs at least one image")
        future = asyncio.get_running_loop().create_future()
        queue = self._queues.get(id(model))
        if queue is None:
            queue = self._queues[id(model)] = deque()
            worker = asyncio.create_task(self._work(model, queue))
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        queue.append((pixels, future))
        return await future

    async def _work(self, model: Model, queue: deque[_Pending]) -> None:
        try:
            while queue:
                taken = _take(queue, self.max_batch_size)
                batch = [(pixels, future) for pixels, future in taken if not future.cancelled()]
                if batch:
                    await self._run(model, batch)
        finally:
            # No await between the emptiness check above and this line: a request queued after
            # it finds no queue and starts a new worker.
            del self._queues[id(model)]

    async def _run(self, model: Model, batch: list[_Pending]) -> None:
        sizes = [len(pixels) for pixels, _ in batch]
        self.batch_sizes.append(sum(sizes))
        try:
            probs = await asyncio.to_thread(model.predict_pixels, np.concatenate([pixels for pixels, _ in batch]))
            if len(probs) != sum(sizes):
                raise RuntimeError(f"{len(probs)} results for a batch of {sum(sizes)}")
        except Exception as error:
            self.failed_in_a_row += 1
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.failed_in_a_row = 0
        ends = np.cumsum(sizes)[:-1]
        for (_, future), rows in zip(batch, np.split(probs, ends), strict=True):
            if not future.done():
                future.set_result(rows)
