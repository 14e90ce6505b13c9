"""Who am I in a batch job: the node group's index from the launcher that started this process.

Slurm's ``srun``, Open MPI's ``mpirun`` and PMIx/PMI launchers give each task of a job its rank in
an environment variable. A node group started by one of them takes its index from that rank, so a
batch script can start every node group with the same command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Checked in this order. SLURM_PROCID comes first: under ``srun --mpi=pmix`` both it and PMIX_RANK
# are set (to the same value), and under ``srun`` inside ``mpirun`` it would be the inner one.
RANK_VARIABLES = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


class LauncherError(ValueError):
    """The launcher's environment holds a rank that is not a number; the message is one sentence."""


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


def node_index_from_launcher(environ: Mapping[str, str] | None = None) -> int | None:
    """The node group's index: the launcher's rank of this task, or None outside a launcher."""
    found = launcher_rank(environ)
    return None if found is None else found[0]
