"""stemstream: stream 4D Camera detector data into compute-node memory, count electrons on the fly,
and write stempy-compatible counted files."""

from stemstream.core.version import SOFTWARE_VERSION as __version__


def open(path, bin_factor: int = 1):  # noqa: A001 - the API's name
    """Open a counted file as a :class:`~stemstream.formats.counted.CountedFile` (see
    :func:`stemstream.formats.counted.open`); imported on first use so that ``import stemstream``
    stays light."""
    from stemstream.formats.counted import open as open_counted

    return open_counted(path, bin_factor)


__all__ = ["__version__", "open"]
