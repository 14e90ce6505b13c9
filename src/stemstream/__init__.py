"""stemstream: stream 4D Camera detector data into compute-node memory, count electrons on the fly,
and write files that stempy and py4DSTEM read."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stemstream")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
