"""The reading, decoding and face-finding step of the scoring pipeline: a Ray Data datasource of
image files.

Ray Data runs it in plain CPU workers, which import this module by name: keeping torch out of
its imports saves each of them seconds of start-up.
"""

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from emotion.faces import FaceConfig, FaceFinder, FacesInImage


class ImageFiles(Datasource):
    """Image files read, decoded and searched for faces inside the same read tasks: one row per
    face the classifier should see, or one row for a file with none (no face found, or an error).

    Reading files into an Arrow column of bytes (`read_binary_files`) and decoding them in the
    next operator spent most of those tasks' time reading through Arrow streams and pickling blocks
    of bytes, not decoding (docs/benchmarks.md). Here a task fetches its files (concurrently from an
    object store) and ships only model-sized pixels. Face detection runs here too, on CPUs, never in
    the inference actors, which may hold GPUs; each task builds its detector once.
    A file that cannot be read becomes an error row like one that cannot be decoded. Each row
    carries its file's index in the job's file list, so progress counts files, and a retried batch
    once. A file's rows are yielded together, in one block.
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
        faces: str,
        face_config: FaceConfig,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.filesystem = filesystem
        self.size, self.channels, self.max_pixels = size, channels, max_pixels
        self.files_per_block, self.batch_size = files_per_block, batch_size
        self.faces, self.face_config = faces, face_config

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
            # Only `whole` knows its row count before reading: one row per file.
            metadata = BlockMetadata(
                num_rows=len(chunk) if self.faces == "whole" else None,
                size_bytes=len(chunk) * self._row_bytes(),
                input_files=None,
                exec_stats=None,
            )
            tasks.append(ReadTask(self._reader(chunk, start), metadata, per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, paths: list[str], first_row: int) -> Callable[[], Iterator[Block]]:
        # The task closes over its own paths and settings only: closing over `self` would ship
        # every path of the job with every task.
        filesystem, batch_size, faces, face_config = self.filesystem, self.batch_size, self.faces, self.face_config
        size, channels, max_pixels = self.size, self.channels, self.max_pixels

        def read_images() -> Iterator[Block]:
            finder = FaceFinder(face_config, size, channels, max_pixels)
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                contents = filesystem.cat(chunk, on_error="return")
                rows = range(first_row + start, first_row + start + len(chunk))
                yield _typed_block(find_faces(chunk, rows, [contents[p] for p in chunk], finder, faces))

        return read_images


def find_faces(
    paths: list[str], rows: range, contents: list[bytes | Exception], finder: FaceFinder, mode: str
) -> dict[str, np.ndarray]:
    """Paths, their indices in the job's file list and their bytes (or the error reading them) to
    one row per face under `mode`: pixels, status (`ok`, `no_face`, `error`), error, the upright
    image's width and height, and the face's index, box, score and its image's face count.

    A file without a face to classify (unreadable, undecodable, or no face found) is one row with
    zero pixels, face index 0 and 0 faces. Boxes travel as plain int32 columns with a width of 0
    where there is no box (the image taken whole, or no face): a detected box is never empty, and
    the inference stage turns these into nulls for the output.
    """
    found = [
        finder.find(data, mode)
        if isinstance(data, bytes)
        else FacesInImage([], 0, 0, f"unreadable: {type(data).__name__}: {data}", False)
        for data in contents
    ]
    count = sum(max(len(image.crops), 1) for image in found)
    size, channels = finder.size, finder.channels
    columns: dict[str, list] = {name: [] for name in (
        "path", "row", "status", "error", "width", "height", "face_index", "faces_in_image",
        "box_x", "box_y", "box_w", "box_h", "face_score")}
    pixels = np.zeros((count, size, size, channels), dtype=np.uint8)
    at = 0
    for path, row, image in zip(paths, rows, found, strict=True):
        status = "error" if image.error is not None else "ok" if image.crops else "no_face"
        for index, crop in enumerate(image.crops or [None]):
            face = crop.face if crop is not None else None
            if crop is not None:
                pixels[at] = crop.pixels
            values = {
                "path": path, "row": row, "status": status, "error": image.error,
                "width": image.width, "height": image.height, "face_index": index,
                "faces_in_image": len(image.crops),
                "box_x": face.x if face else 0, "box_y": face.y if face else 0,
                "box_w": face.w if face else 0, "box_h": face.h if face else 0,
                "face_score": face.score if face else np.nan,
            }
            for name, value in values.items():
                columns[name].append(value)
            at += 1
    types = {"path": object, "status": object, "error": object, "row": np.int64, "face_score": np.float32}
    batch = {name: np.asarray(values, dtype=types.get(name, np.int32)) for name, values in columns.items()}
    return batch | {"pixels": pixels}


def _typed_block(batch: dict[str, np.ndarray]) -> Block:
    """The batch as an Arrow block whose text columns are strings even when every value is null,
    so blocks with and without errors share one schema."""
    block = BlockAccessor.batch_to_block(batch)
    for name in ("path", "status", "error"):
        block = block.set_column(block.schema.get_field_index(name), name, pa.array(batch[name], pa.string()))
    return block
