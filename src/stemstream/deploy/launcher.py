"""Who am I in a batch job: the node group's index from the launcher that started this process.

Slurm's ``srun``, Open MPI's ``mpirun`` and PMIx/PMI launchers give each task of a job its rank in
an environment variable. A node group started by one of them takes its index from that rank, so a
batch script can start every node group with the same command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from stemstream.core.detector import N_MODULES

# Checked in this order. SLURM_PROCID comes first: under ``srun --mpi=pmix`` both it and PMIX_RANK
# are set (to the same value), and under ``srun`` inside ``mpirun`` it would be the inner one.
RANK_VARIABLES = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


# The highest TCP port: node group indices end where their ports would pass it.
HIGHEST_PORT = 65535


class LauncherError(ValueError):
    """A node group index that cannot be used: the launcher's rank is not a number, or an index
    (given or the rank) has no ports; the message is one sentence."""


def launcher_rank(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """The rank the launcher gave this process and the variable it came from, or None when no
    known launcher started it. Raises LauncherError for a value that is not a rank."""
    environ = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        text = environ.get(name)
        if text is None or text.strip() == "":
            continue
        try:
            rank = int(text.strip())
        except ValueError:
            raise LauncherError(f"the launcher's {name}={text!r} is not a task rank (a whole number 0 or above)") from None
        if rank < 0:
            raise LauncherError(f"the launcher's {name}={text!r} is not a task rank (a whole number 0 or above)")
        return rank, name
    return None


def last_node_index(node_base_port: int) -> int:
    """The highest node group index whose ports all exist: node group i listens on
    node_base_port + N_MODULES i + module (NetworkConfig.node_port)."""
    return (HIGHEST_PORT - (N_MODULES - 1) - node_base_port) // N_MODULES


def node_index(given: int | None, node_base_port: int, environ: Mapping[str, str] | None = None) -> int:
    """The node group's index: ``given`` (--index) if not None, else the rank the launcher gave
    this task, else 0. Raises LauncherError for a bad rank or an index that has no ports."""
    if given is not None:
        index, source = given, f"--index {given}"
    else:
        found = launcher_rank(environ)
        index, source = (found[0], f"the launcher's rank {found[1]}={found[0]}") if found else (0, "--index 0")
    last = last_node_index(node_base_port)
    if not 0 <= index <= last:
        raise LauncherError(f"{source} must be 0 to {last} (node group i listens on node_base_port + "
                            f"{N_MODULES} i + module)")
    return index
