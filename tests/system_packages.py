"""Debian packages that integration tests need (a browser, a batch system), installed on demand.

Tests that drive real system programs (Chromium, Slurm's daemons) install them with apt-get the
first time they run on a machine, when they can (root, apt-get present); otherwise they skip with
the reason this module returns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def install_debian_packages(packages: list[str], needed: list[str]) -> str | None:
    """Install Debian ``packages`` unless every path in ``needed`` exists already. Returns None
    when the paths exist afterwards, else one sentence saying why not (for pytest.skip)."""
    if all(Path(p).exists() for p in needed):
        return None
    names = " ".join(packages)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"not root, so Debian's {names} cannot be installed here"
    if shutil.which("apt-get") is None:
        return f"no apt-get to install Debian's {names} with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        # The package lists may be stale or missing: update them only when the install fails.
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=True)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                return f"apt-get install {names} failed: {result.stderr.strip().splitlines()[-1:]}"
    except (subprocess.SubprocessError, OSError) as exc:
        return f"apt-get install {names} failed: {exc}"
    missing = [p for p in needed if not Path(p).exists()]
    return f"apt-get installed {names} but {', '.join(missing)} is missing" if missing else None
