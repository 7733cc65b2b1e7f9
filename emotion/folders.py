"""Finding images in local folders and S3 prefixes, and reading labelled sets (class sub-folders)."""

import os
import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fsspec import AbstractFileSystem

from emotion.labels import canonical_label
from emotion.uris import filesystem, full_uri, strip_scheme

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ImageListing:
    """Image files found under a location, and what was passed over with the reason."""

    paths: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def _walk_local(root: str) -> tuple[list[str], dict[str, str]]:
    """Regular files under a local folder, following symbolic links to folders once each.

    A FIFO named like an image would block its reader forever, and a device or socket is no
    image either: only regular files are returned; the rest, broken links and link loops are
    reported instead of silently dropped.
    """
    files: list[str] = []
    skipped: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()

    def visit(folder: str) -> None:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            skipped[folder] = "folder already listed (symbolic link loop or second link)"
            return
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                try:
                    mode = os.stat(entry.path).st_mode
                except OSError as exc:
                    if is_image_name(entry.name):
                        skipped[entry.path] = f"unreadable: {exc.strerror or exc}"
                    continue
                if stat.S_ISDIR(mode):
                    visit(entry.path)
                elif stat.S_ISREG(mode):
                    files.append(entry.path)
                elif is_image_name(entry.name):
                    skipped[entry.path] = "not a regular file"

    visit(root)
    return files, skipped


def _find_files(fs: AbstractFileSystem, root: str) -> tuple[list[str], dict[str, str]]:
    if full_uri(fs, root) == root:
        return _walk_local(root)
    return fs.find(root, withdirs=False), {}


def list_images(uri: str) -> ImageListing:
    """Every image file under `uri`, recursively, sorted; extensions match in any case."""
    fs, root = filesystem(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {uri}")
    if fs.isfile(root):
        return ImageListing([full_uri(fs, root)] if is_image_name(root) else [])
    found, skipped = _find_files(fs, root)
    return ImageListing(sorted(full_uri(fs, p) for p in found if is_image_name(p)), skipped)


@dataclass
class LabelledSet:
    """Images of a labelled set with their canonical labels; unknown classes kept apart by name."""

    paths: list[str]
    labels: list[str]
    unknown: dict[str, list[str]]


def list_labelled_images(uri: str) -> LabelledSet:
    """Images in the class sub-folders of `uri`; folder names go through the alias table.

    A folder whose name maps to no class (CK+'s `contempt`) is returned under `unknown`, never
    mapped onto a neighbour, so callers can report and count what they excluded.
    """
    fs, root = filesystem(uri)
    if not fs.exists(root) or not fs.isdir(root):
        raise FileNotFoundError(f"labelled set not found: {uri}")
    subfolders = sorted(
        p for p in fs.ls(root, detail=False) if fs.isdir(p) and p.rstrip("/") != root.rstrip("/")
    )
    if not subfolders:
        raise ValueError(f"{uri}: no class sub-folders (expected e.g. {uri}/happy/*.jpg)")
    paths: list[str] = []
    labels: list[str] = []
    unknown: dict[str, list[str]] = {}
    for folder in subfolders:
        name = os.path.basename(folder.rstrip("/"))
        found, _ = _find_files(fs, folder)
        images = sorted(full_uri(fs, p) for p in found if is_image_name(p))
        label = canonical_label(name)
        if label is None:
            unknown[name] = images
            continue
        paths.extend(images)
        labels.extend([label] * len(images))
    if not paths and not unknown:
        raise ValueError(f"{uri}: the class sub-folders hold no images")
    return LabelledSet(paths, labels, unknown)


def read_many(paths: list[str]) -> list[bytes]:
    """The bytes of each path, fetched concurrently for object stores."""
    if not paths:
        return []
    fs, _ = filesystem(paths[0])
    stripped = [strip_scheme(p) for p in paths]
    contents = fs.cat(stripped, on_error="return")
    return [c if isinstance(c, bytes) else b"" for c in (contents[p] for p in stripped)]
