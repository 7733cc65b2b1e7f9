"""The reading and decoding step of the scoring pipeline: a Ray Data datasource of image files.

Ray Data runs it in plain CPU workers, which import this module by name: keeping torch out of
its imports saves each of them seconds of start-up.
"""

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from emotion.preprocess import Decoded, decode_image


class ImageFiles(Datasource):
    """Image files read and decoded inside the same read tasks, one row per file.

    Reading files into an Arrow column of bytes (`read_binary_files`) and decoding them in the
    next operator spent most of those tasks' time reading through Arrow streams and pickling blocks
    of bytes, not decoding (docs/benchmarks.md). Here a task fetches its files (concurrently from an
    object store) and ships only model-sized pixels.
    A file that cannot be read becomes an error row like one that cannot be decoded. Each row
    carries its index in the job's file list, so progress counts a retried row once.
    """

    def __init__(
        self,
        paths: list[str],
        filesystem: AbstractFileSystem,
        size: int,
        channels: int,
        max_pixels: int,
        files_per_block: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.filesystem = filesystem
        self.size, self.channels, self.max_pixels = size, channels, max_pixels
        self.files_per_block, self.batch_size = files_per_block, batch_size

    def _row_bytes(self) -> int:
        return self.size * self.size * self.channels + 256

    def estimate_inmemory_data_size(self) -> int:
        return len(self.paths) * self._row_bytes()

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ReadTask]:
        """One task per `files_per_block` files, whatever parallelism Ray Data suggests: task size
        bounds the work in flight, so it is the job's choice."""
        tasks = []
        for start in range(0, len(self.paths), self.files_per_block):
            chunk = self.paths[start : start + self.files_per_block]
            metadata = BlockMetadata(
                num_rows=len(chunk), size_bytes=len(chunk) * self._row_bytes(), input_files=None, exec_stats=None
            )
            tasks.append(ReadTask(self._reader(chunk, start), metadata, per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, paths: list[str], first_row: int) -> Callable[[], Iterator[Block]]:
        # The task closes over its own paths and settings only: closing over `self` would ship
        # every path of the job with every task.
        filesystem, batch_size = self.filesystem, self.batch_size
        size, channels, max_pixels = self.size, self.channels, self.max_pixels

        def read_images() -> Iterator[Block]:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                contents = filesystem.cat(chunk, on_error="return")
                batch = decode_files(chunk, [contents[p] for p in chunk], size, channels, max_pixels)
                batch["row"] = np.arange(first_row + start, first_row + start + len(chunk), dtype=np.int64)
                yield _typed_block(batch)

        return read_images


def decode_files(
    paths: list[str], contents: list[bytes | Exception], size: int, channels: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """Paths and their bytes (or the error reading them) to pixels plus per-row status, width,
    height and error."""
    rows = [
        decode_image(data, size, channels, max_pixels)
        if isinstance(data, bytes)
        else Decoded(None, 0, 0, f"unreadable: {type(data).__name__}: {data}")
        for data in contents
    ]
    pixels = np.zeros((len(rows), size, size, channels), dtype=np.uint8)
    for i, row in enumerate(rows):
        if row.pixels is not None:
            pixels[i] = row.pixels
    return {
        "path": np.asarray(paths, dtype=object),
        "pixels": pixels,
        "status": np.asarray(["ok" if r.error is None else "error" for r in rows], dtype=object),
        "error": np.asarray([r.error for r in rows], dtype=object),
        "width": np.asarray([r.width for r in rows], dtype=np.int32),
        "height": np.asarray([r.height for r in rows], dtype=np.int32),
    }


def _typed_block(batch: dict[str, np.ndarray]) -> Block:
    """The batch as an Arrow block whose text columns are strings even when every value is null,
    so blocks with and without errors share one schema."""
    block = BlockAccessor.batch_to_block(batch)
    for name in ("path", "status", "error"):
        block = block.set_column(block.schema.get_field_index(name), name, pa.array(batch[name], pa.string()))
    return block
