"""stemstream: stream 4D Camera detector data into compute-node memory, count electrons on the fly,
and write stempy-compatible counted files."""

from stemstream.core.version import SOFTWARE_VERSION as __version__

__all__ = ["__version__"]
