"""What every `python -m jobs.X` shares: the one-line usage error and the start of `main`."""

import argparse
import logging
import os


class UsageError(Exception):
    """A problem with the command line or its inputs, reported in one line before any work."""


def start(parser: argparse.ArgumentParser, argv: list[str] | None = None,
          args: argparse.Namespace | None = None) -> argparse.Namespace:
    """Parse the flags and set up logging and the S3 endpoint, as every job's `main` begins.

    Only the jobs' own loggers speak at INFO: libraries (botocore, s3fs) would otherwise put their
    chatter before a one-line error. `--endpoint-url` is exported as AWS_ENDPOINT_URL, which
    botocore reads in this process, and kept on the flags for the filesystems shipped to workers.
    """
    args = args if args is not None else parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jobs").setLevel(logging.INFO)
    if getattr(args, "endpoint_url", None):
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    if hasattr(args, "endpoint_url"):
        args.endpoint_url = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    return args

