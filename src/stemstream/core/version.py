"""The version string written into every file stemstream makes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    SOFTWARE_VERSION = version("stemstream")
except PackageNotFoundError:  # running from a source tree that was not installed
    SOFTWARE_VERSION = "0.0.0+unknown"
