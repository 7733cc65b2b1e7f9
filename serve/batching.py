"""Adaptive batching: a lone request runs at once, requests that arrive during a pass share the next.

Serve's `@serve.batch` (Ray 2.60) either waits `batch_wait_timeout_s` after a batch's first request
for company, which a lone request pays in full, or, with a wait of 0, closes a batch as soon as a
request arrives and queues it behind the running one, so that under load nearly every batch holds
one request. Neither lets the batch size follow the load, so the replica batches here instead.

Per model there is one queue and, while the queue has work, one worker. The worker takes
everything queued (up to `max_batch_size`), runs one forward pass in a thread so that the event
loop keeps reading and decoding the next requests, and repeats; when the queue is empty it ends.
No timer is ever armed: an idle model starts on the first request, and a busy one collects the
arrivals of one forward pass into the next.
"""

import asyncio
from collections import deque
from typing import Protocol

import numpy as np


class Model(Protocol):
    """What the batcher needs of a model: `emotion.Predictor` is one."""

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


_Pending = tuple[np.ndarray, asyncio.Future]


class Batcher:
    """Groups concurrent `predict` calls for the same model object into forward passes.

    Models are keyed by identity, not by name: a request decoded for one loaded checkpoint is
    scored by that checkpoint even if its name has been evicted and loaded again meanwhile.
    `batch_sizes` (the most recent) and `failed_in_a_row` are there for /stats and the health check.
    """

    def __init__(self, max_batch_size: int, history: int = 1000) -> None:
        self.max_batch_size = max_batch_size
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.failed_in_a_row = 0
        self._queues: dict[int, deque[_Pending]] = {}
        self._workers: set[asyncio.Task] = set()

    async def predict(self, model: Model, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for one image (H x W x C), computed in a forward pass shared with others."""
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
                taken = [queue.popleft() for _ in range(min(len(queue), self.max_batch_size))]
                batch = [(pixels, future) for pixels, future in taken if not future.cancelled()]
                if batch:
                    await self._run(model, batch)
        finally:
            # No await between the emptiness check above and this line: a request queued after
            # it finds no queue and starts a new worker.
            del self._queues[id(model)]

    async def _run(self, model: Model, batch: list[_Pending]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            probs = await asyncio.to_thread(_forward, model, [pixels for pixels, _ in batch])
            if len(probs) != len(batch):
                raise RuntimeError(f"{len(probs)} results for a batch of {len(batch)}")
        except Exception as error:
            self.failed_in_a_row += 1
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.failed_in_a_row = 0
        for (_, future), row in zip(batch, probs, strict=True):
            if not future.done():
                future.set_result(row)


def _forward(model: Model, images: list[np.ndarray]) -> np.ndarray:
    return model.predict_pixels(np.stack(images))
