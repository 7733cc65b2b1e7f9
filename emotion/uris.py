"""URIs: the one place that knows schemes. A user writes `s3://bucket/key` or a local path; fsspec
and Ray Data's readers name the same object `bucket/key`; the output keeps the latter in `path`.
"""

import os

import fsspec
import pyarrow.fs
from fsspec import AbstractFileSystem


def scheme(uri: str) -> str:
    """`s3` for `s3://...`, `file` for a local path."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def strip_scheme(uri: str) -> str:
    """A URI as filesystems and Ray Data's readers name it: `bucket/key` for `s3://bucket/key`."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, one slash between each."""
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it.

    S3 uses the standard AWS credential chain; S3-compatible stores are reached through
    AWS_ENDPOINT_URL, which botocore reads itself, or `endpoint_url`, which travels with the
    filesystem when it is shipped to Ray workers whose environment may not have the variable.
    """
    options = {"endpoint_url": endpoint_url} if endpoint_url and uri.startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> pyarrow.fs.FileSystem | None:
    """A pyarrow filesystem for Ray Data's readers and writers on `uri`, None for local paths.

    pyarrow's own S3 client is given the endpoint explicitly, so S3-compatible stores work the
    same for listing (s3fs) and for reading and writing (Arrow).
    """
    if not uri.startswith("s3://"):
        return None
    if not endpoint_url:
        return pyarrow.fs.S3FileSystem()
    scheme, _, host = endpoint_url.partition("://")
    return pyarrow.fs.S3FileSystem(endpoint_override=host or scheme, scheme=scheme if host else "https")


def full_uri(fs: AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: s3://bucket/key for S3, the plain path locally."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def absolute_uri(uri: str) -> str:
    """`uri` with a local path made absolute, since Ray workers do not share the driver's cwd."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def portable_name(uri: str) -> str:
    """How a checkpoint names the data it came from: an object store URI as it is, a local folder
    by its last two parts (`fer2013/train`), since the rest of a local path says only where one
    machine kept its copy."""
    if "://" in uri and scheme(uri) != "file":
        return uri
    parts = [part for part in strip_scheme(uri).split("/") if part]
    return "/".join(parts[-2:])

