"""``stemstream slurm-script``: node groups as a Slurm batch job (write the script, or submit it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from stemstream.cli.support import UserError, console, guarded


@guarded
def slurm_script(
    nodes: Annotated[int, typer.Option("--nodes", help="Cluster nodes the job takes.")],
    config: Annotated[Path, typer.Option("--config", help="Pipeline config (TOML) the node groups read; [pipeline] nodes must be NODES x TASKS_PER_NODE.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the script here (default: print it, or with --submit hand it to sbatch).")] = None,
    tasks_per_node: Annotated[int, typer.Option("--tasks-per-node", help="Node groups on each node.")] = 1,
    cpus_per_task: Annotated[Optional[int], typer.Option("--cpus-per-task", help="CPUs (counting threads) of each node group (default: the node's CPUs shared among its node groups, node held exclusively).")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", help="Slurm partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="Time limit, HH:MM:SS or D-HH:MM:SS.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="Slurm account to charge.")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="Submit the script with sbatch and print the job id.")] = False,
) -> None:
    """Write a Slurm batch script that starts the node groups as srun tasks (node group index
    from SLURM_PROCID); with --submit, submit it. Control, producers, gateway and writer run
    elsewhere from the same config."""
    from stemstream.deploy import slurm

    spec = slurm.SlurmJob(config=config, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                          partition=partition, time=time_limit, account=account)
    try:
        cfg = spec.check()
    except slurm.SlurmError as exc:
        raise UserError(str(exc)) from None
    text = spec.script(cfg)
    if output is not None:
        try:
            output.write_text(text)
            output.chmod(0o755)
        except OSError as exc:
            raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    if submit:
        try:
            job_id = slurm.submit(text)
        except slurm.SlurmError as exc:
            raise UserError(str(exc)) from None
        print(job_id)
    elif output is None:
        sys.stdout.write(text)
    else:
        console.print(f"wrote {output}; submit it with: sbatch {output}", highlight=False, soft_wrap=True)
    # After the work, so that an error stays the only line on stderr.
    host = slurm.loopback_control(cfg)
    if host is not None:
        Console(stderr=True).print(f"[yellow]warning:[/] control's host is {host}: only node groups on this "
                                   "host reach it (set \\[network] control_host for a cluster)",
                                   highlight=False, soft_wrap=True)
