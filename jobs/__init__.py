"""Command-line jobs (`python -m jobs.X`), thin adapters over the `emotion` module."""
