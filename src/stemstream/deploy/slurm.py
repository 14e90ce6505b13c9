"""Node groups as a Slurm batch job: the batch script, and submitting it with ``sbatch``.

The microscope side (control, producers, gateway, writer) runs elsewhere; the job only starts node
groups. ``srun`` starts ``nodes x tasks_per_node`` tasks, each running
``<python> -m stemstream node --config <file>``; a task takes its node group index from
SLURM_PROCID (see :mod:`stemstream.deploy.launcher`) and checks in with control by heartbeat, which
is how the microscope side learns that the node groups are up.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stemstream.core.config import ConfigError, PipelineConfig
from stemstream.deploy.launcher import last_node_index
from stemstream.deploy.settings import load_settings

# Slurm's --time also takes minutes alone and other forms; one unambiguous form is enough here.
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
# Partition and account names go into the script verbatim: no spaces, quotes or newlines.
_NAME = re.compile(r"^[A-Za-z0-9_.+:,-]+$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class SlurmError(ValueError):
    """Options or a submission that do not work; the message is one sentence."""


def loopback_control(config: PipelineConfig) -> str | None:
    """Control's host when it is a loopback address (which node groups on other hosts cannot
    reach), else None."""
    host = config.network.control_host or config.network.host
    return host if host in _LOOPBACK else None


@dataclass
class SlurmJob:
    """What the batch script asks for. ``cpus_per_task`` None: each node is held exclusively and
    its CPUs are shared among its tasks."""

    config: Path
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "stemstream-nodes"
    # The interpreter that has stemstream installed, as this process found it (not resolved: a
    # virtual environment's python is a link, and resolving it would leave the environment).
    python: str = field(default_factory=lambda: str(Path(sys.executable).absolute()))
    workdir: Path = field(default_factory=Path.cwd)

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self) -> PipelineConfig:
        """Check the options and the config; returns the loaded config. Raises SlurmError."""
        if self.nodes < 1:
            raise SlurmError(f"--nodes must be at least 1, got {self.nodes}")
        if self.tasks_per_node < 1:
            raise SlurmError(f"--tasks-per-node must be at least 1, got {self.tasks_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.time is not None and not _TIME.match(self.time):
            raise SlurmError(f"--time must look like HH:MM:SS or D-HH:MM:SS (e.g. 01:30:00), got {self.time!r}")
        for option, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None and not _NAME.match(value):
                raise SlurmError(f"{option} must be a Slurm name (letters, digits, _ . + : , -), got {value!r}")
        if not self.config.is_file():
            raise SlurmError(f"the config file {self.config} does not exist")
        try:
            config = load_settings(self.config)
        except ConfigError as exc:
            raise SlurmError(str(exc)) from None
        last = last_node_index(config.network.node_base_port)
        if self.tasks - 1 > last:
            raise SlurmError(f"--nodes {self.nodes} x --tasks-per-node {self.tasks_per_node} starts {self.tasks} node "
                             f"groups, but [network] node_base_port {config.network.node_base_port} leaves ports "
                             f"for {last + 1}")
        if config.network.transport != "tcp":
            raise SlurmError(f"[network] transport {config.network.transport!r} reaches only roles on one host; "
                             f"a batch job's node groups need \"tcp\"")
        control_host = loopback_control(config)
        if self.nodes > 1 and control_host is not None:
            raise SlurmError(f"control's host is {control_host}, which node groups on other hosts cannot reach; "
                             f"set [network] control_host to the control host's address")
        return config

    def _srun_lines(self, config: PipelineConfig) -> list[str]:
        srun = f"srun --ntasks={self.tasks} --ntasks-per-node={self.tasks_per_node} --cpus-per-task=\"$CPUS\" \\"
        command = f"{shlex.join([self.python, '-m', 'stemstream', 'node'])} --config \"$CONFIG\" --workers \"$CPUS\""
        intro = [
            "# One task per node group, each running the Python that has stemstream installed. A task",
            "# takes its node group index from SLURM_PROCID (0, 1, ...) and counts with one thread per",
            "# CPU it has (--workers). Slurm 22.05 to 23.02 do not pass the job's --cpus-per-task on to",
            "# srun by themselves, so it is given here again.",
        ]
        if len(config.network.node_hosts) >= self.tasks:
            # The config names every node group's host: each registers with control under that.
            return [*intro, "# Each node group tells control it is at its host in [network] node_hosts.",
                    srun, f"    {command}"]
        # Which host a task lands on is known only when it runs, so a shell on that host asks.
        return [*intro,
                "# Each node group tells control the name of the host it runs on (--advertise-host): the",
                "# gateway sends the node group its share of every scan there.",
                srun, "    bash -c 'exec \"$@\" --advertise-host \"$(hostname)\"' node-group \\", f"    {command}"]

    def script(self, config: PipelineConfig | None = None) -> str:
        """The batch script's text (after :meth:`check`, whose config it takes)."""
        config = config if config is not None else load_settings(self.config)
        path = self.config.absolute()
        sbatch = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}"]
        if self.cpus_per_task is not None:
            sbatch.append(f"--cpus-per-task={self.cpus_per_task}")
        else:
            sbatch.append("--exclusive")
        for option, value in (("partition", self.partition), ("time", self.time), ("account", self.account)):
            if value is not None:
                sbatch.append(f"--{option}={value}")
        sbatch.append(f"--chdir={self.workdir.absolute()}")
        sbatch.append(f"--output={self.job_name}-%j.out")
        if self.cpus_per_task is not None:
            cpus_comment = f"# CPUs of each node group: the job's --cpus-per-task ({self.cpus_per_task})."
            cpus = 'CPUS="$SLURM_CPUS_PER_TASK"'
        else:
            cpus_comment = (f"# CPUs of each node group: the node is the job's alone (--exclusive), so its CPUs are\n"
                            f"# shared among the {self.tasks_per_node} task(s) on it.")
            cpus = f'CPUS="$(( SLURM_CPUS_ON_NODE / {self.tasks_per_node} ))"'
        lines = [
            "#!/bin/bash",
            f"# stemstream node groups as a Slurm batch job: {self.tasks} node group(s),",
            f"# {self.tasks_per_node} per node on {self.nodes} node(s). Written by `stemstream slurm-script`.",
            "#",
            "# The microscope side (control, producers, gateway, writer) runs elsewhere, from the same",
            "# config. Each node group checks in with control by heartbeat: start scans once control's",
            f"# status lists node-0 to node-{self.tasks - 1}. Submit with: sbatch <this file>",
            "",
            "# What the job asks Slurm for.",
            *(f"#SBATCH {option}" for option in sbatch),
            "",
            "# Stop at the first failing command and at unset variables.",
            "set -euo pipefail",
            "",
            cpus_comment,
            cpus,
            "",
            "# The config file every role reads (the microscope side's too).",
            f"CONFIG={shlex.quote(str(path))}",
            f"echo \"stemstream: job $SLURM_JOB_ID starts {self.tasks} node group(s) on $SLURM_JOB_NODELIST, $CPUS CPU(s) each\"",
            "",
            *self._srun_lines(config),
            "",
        ]
        return "\n".join(lines)


def submit(script: str, sbatch: str = "sbatch", cwd: Path | None = None, timeout_s: float = 60.0) -> str:
    """Submit a batch script (its text, given on stdin) with ``sbatch --parsable``; returns the job
    id. Raises SlurmError when sbatch is missing or refuses."""
    executable = shutil.which(sbatch)
    if executable is None:
        raise SlurmError(f"{sbatch} was not found on PATH: submit from a host where Slurm's commands are installed")
    try:
        result = subprocess.run([executable, "--parsable"], input=script, capture_output=True, text=True,
                                cwd=cwd, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch did not answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise SlurmError(f"sbatch could not run: {exc.strerror or exc}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {result.returncode}"
        raise SlurmError(f"sbatch refused the job: {why}")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch gave no job id (it printed {result.stdout.strip()!r})")
    return job_id
