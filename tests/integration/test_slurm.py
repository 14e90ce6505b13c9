"""Node groups in a batch system: the launcher's rank as the node group index, the Slurm batch
script, and a real one-node Slurm cluster that runs the node groups of a streamed scan.

The cluster test installs Debian's slurm-wlm and munge if they are missing (once per machine; root
and apt-get needed, else it skips), starts munged, slurmctld and slurmd on localhost with their
state under a temporary directory, and stops them by process id at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from pipeline_support import assert_same_events, test_config
from stemstream.transport.ports import free_port_block
from stemstream.cli.app import app
from stemstream.deploy.launcher import RANK_VARIABLES, LauncherError, launcher_rank, node_index
from stemstream.deploy.slurm import SlurmError, SlurmJob
from stemstream.formats.sparse_h5 import read_counted
from stemstream.transport.control_client import ControlClient, ControlUnavailable
from system_packages import install_debian_packages
from test_cli import assert_one_line_error, stemstream

# -- helpers: processes and bounded waits ------------------------------------------------------------


def _wait_for(predicate, timeout_s: float, what: str, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
            raise AssertionError(f"{what} within {timeout_s:g} s\n{tails}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _env(**variables) -> dict:
    """This process's environment without any launcher's rank, plus ``variables``."""
    clean = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    return {**clean, **variables}


def _start_role(procs: dict, logs: Path, key: str, config: Path, *args: str, env: dict | None = None) -> None:
    out = open(logs / f"{key}.log", "ab")
    procs[key] = subprocess.Popen([sys.executable, "-m", "stemstream", *args, "--config", str(config)],
                                  stdout=out, stderr=subprocess.STDOUT,
                                  env={**_env(), "PYTHONUNBUFFERED": "1", **(env or {})})
    out.close()


def _alive_check(procs: dict, logs: Path) -> None:
    for key, proc in procs.items():
        if proc.poll() is not None:
            raise AssertionError(f"{key} exited with code {proc.returncode}: {(logs / f'{key}.log').read_text()[-1500:]}")


# -- the launcher's rank ------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"])
def test_rank_comes_from_each_launchers_variable(variable):
    assert launcher_rank({variable: "3"}) == (3, variable)
    assert launcher_rank({variable: " 7 "}) == (7, variable)


def test_slurm_wins_over_mpi_and_no_launcher_gives_none():
    assert launcher_rank({"PMIX_RANK": "1", "SLURM_PROCID": "2", "OMPI_COMM_WORLD_RANK": "4"}) == (2, "SLURM_PROCID")
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "4", "PMI_RANK": "5"}) == (4, "OMPI_COMM_WORLD_RANK")
    assert launcher_rank({"PATH": "/bin", "SLURM_PROCID": ""}) is None


def test_node_index_is_the_option_else_the_rank_else_0_and_must_have_ports():
    assert node_index(5, 5560, {"SLURM_PROCID": "2"}) == 5
    assert node_index(None, 5560, {"SLURM_PROCID": "2"}) == 2
    assert node_index(None, 5560, {}) == 0
    last = (65535 - 3 - 5560) // 4  # node group i listens on 5560 + 4 i + module, module 0 to 3
    assert node_index(last, 5560, {}) == last
    with pytest.raises(LauncherError, match=f"--index {last + 1} must be 0 to {last}"):
        node_index(last + 1, 5560, {})
    with pytest.raises(LauncherError, match=f"the launcher's rank PMI_RANK={last + 1} must be 0 to {last}"):
        node_index(None, 5560, {"PMI_RANK": str(last + 1)})


@pytest.mark.parametrize("value", ["two", "1.5", "-1", "0x2"])
def test_a_rank_that_is_not_a_number_is_one_sentence(value):
    with pytest.raises(LauncherError, match=f"SLURM_PROCID={value!r} is not a task rank"):
        launcher_rank({"SLURM_PROCID": value})


def _node_command(config: Path, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stemstream", "node", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_node_command_refuses_a_bad_or_too_large_launcher_rank(tmp_path):
    config = test_config(tmp_path).write(tmp_path / "pipeline.toml")
    assert_one_line_error(_node_command(config, env=_env(SLURM_PROCID="abc")), "SLURM_PROCID='abc' is not a task rank")
    # node group i listens on node_base_port + 4 i + module: a rank past 65535 has no ports
    assert_one_line_error(_node_command(config, env=_env(OMPI_COMM_WORLD_RANK="99999")),
                          "the launcher's rank OMPI_COMM_WORLD_RANK=99999 must be 0 to")
    # --index wins over the launcher
    assert_one_line_error(_node_command(config, "--index", "99998", env=_env(SLURM_PROCID="0")), "--index 99998 must be 0 to")
    assert_one_line_error(_node_command(config, "--workers", "0", env=_env(PMI_RANK="1")), "--workers must be at least 1")


def test_node_command_whose_port_is_taken_says_so_in_one_line(tmp_path):
    config = test_config(tmp_path)
    path = config.write(tmp_path / "pipeline.toml")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", config.network.node_port(1, 2)))
        holder.listen()
        assert_one_line_error(_node_command(path, "--index", "1", env=_env()), "cannot listen",
                              f"127.0.0.1:{config.network.node_port(1, 2)}", "another program holds that port")


def _node_groups_checked_in(control: ControlClient, procs: dict, tmp_path) -> set[str]:
    """The node groups control has heard from (none while it is not up yet); raises if one of
    ``procs`` died."""
    _alive_check(procs, tmp_path)
    try:
        return {k for k in control.request("status", timeout_s=1.0)["roles"] if k.startswith("node")}
    except ControlUnavailable:
        return set()


@contextlib.contextmanager
def _control_alone(tmp_path):
    """A real control process on a fresh config: (config path, processes to add to, client); on
    exit control is told to shut down and every process is stopped."""
    config = test_config(tmp_path)
    path = config.write(tmp_path / "pipeline.toml")
    procs: dict[str, subprocess.Popen] = {}
    control = ControlClient.for_config(config, timeout_s=5.0)
    try:
        _start_role(procs, tmp_path, "control", path, "control")
        yield path, procs, control
    finally:
        control.close()
        for proc in procs.values():
            _stop(proc, 5.0)


def test_a_node_group_started_as_mpi_rank_1_checks_in_as_node_1(tmp_path):
    """What ``mpirun -np 2 python -m stemstream node --config F`` gives each process: its rank in
    OMPI_COMM_WORLD_RANK, and no --index. Real control and node group processes."""
    with _control_alone(tmp_path) as (path, procs, control):
        _start_role(procs, tmp_path, "node", path, "node", "--workers", "1", env={"OMPI_COMM_WORLD_RANK": "1"})
        _wait_for(lambda: _node_groups_checked_in(control, procs, tmp_path) == {"node-1"}, 60,
                  "the node group did not check in as node-1", [tmp_path / "node.log", tmp_path / "control.log"])
        control.request("shutdown", timeout_s=2.0)
        assert procs["node"].wait(30) == 0


def test_mpirun_starts_two_node_groups_that_check_in_as_node_0_and_node_1(tmp_path):
    """The MPI launch of docs/hpc.md: one command line, the index of each from OMPI_COMM_WORLD_RANK."""
    reason = install_debian_packages(["openmpi-bin"], ["/usr/bin/mpirun"])
    if reason:
        pytest.skip(reason)
    with _control_alone(tmp_path) as (path, procs, control):
        with open(tmp_path / "mpirun.log", "ab") as out:
            procs["mpirun"] = subprocess.Popen(
                ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                 sys.executable, "-m", "stemstream", "node", "--config", str(path), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=_env())
        _wait_for(lambda: _node_groups_checked_in(control, procs, tmp_path) == {"node-0", "node-1"}, 60,
                  "mpirun's ranks did not check in as node-0 and node-1", [tmp_path / "mpirun.log"])
        control.request("shutdown", timeout_s=2.0)
        assert procs["mpirun"].wait(30) == 0  # both ranks ended cleanly on control's shutdown


# -- the batch script ------------------------------------------------------------------------------------

runner = CliRunner()


def _config(tmp_path: Path, nodes: int, control_host: str = "") -> Path:
    config = test_config(tmp_path, nodes=nodes)
    config.network.control_host = control_host
    return config.write(tmp_path / "pipeline.toml")


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_script_for_one_node_with_two_node_groups_of_one_cpu(tmp_path, monkeypatch):
    _config(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["slurm-script", "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1",
                                 "--config", "pipeline.toml", "--partition", "debug", "--time", "0-01:30:00",
                                 "--account", "m1234"])
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    assert _sbatch_lines(script) == ["--job-name=stemstream-nodes", "--nodes=1", "--ntasks-per-node=2",
                                     "--cpus-per-task=1", "--partition=debug", "--time=0-01:30:00",
                                     "--account=m1234", f"--chdir={tmp_path}", "--output=stemstream-nodes-%j.out"]
    assert 'CPUS="$SLURM_CPUS_PER_TASK"' in script
    assert f"CONFIG={tmp_path / 'pipeline.toml'}" in script  # absolute, though given relative
    python = str(Path(sys.executable).absolute())
    assert script.endswith(
        'srun --ntasks=2 --ntasks-per-node=2 --cpus-per-task="$CPUS" \\\n'
        """    bash -c 'exec "$@" --advertise-host "$(hostname)"' node-group \\\n"""
        f'    {python} -m stemstream node --config "$CONFIG" --workers "$CPUS"\n')
    assert "--index" not in script  # the index comes from SLURM_PROCID
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # bash can parse it


def test_script_without_cpus_per_task_holds_the_nodes_and_shares_their_cpus(tmp_path):
    config = _config(tmp_path, 6, control_host="10.1.2.3")
    out = tmp_path / "nodes.sh"
    result = runner.invoke(app, ["slurm-script", "--nodes", "3", "--tasks-per-node", "2", "--config", str(config),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"sbatch {out}" in result.stdout
    script = out.read_text()
    assert os.access(out, os.X_OK)
    sbatch = _sbatch_lines(script)
    assert "--nodes=3" in sbatch and "--ntasks-per-node=2" in sbatch and "--exclusive" in sbatch
    assert not [line for line in sbatch if line.split("=")[0] in ("--cpus-per-task", "--partition", "--time", "--account")]
    assert 'CPUS="$(( SLURM_CPUS_ON_NODE / 2 ))"' in script
    assert "srun --ntasks=6 --ntasks-per-node=2" in script
    assert "--advertise-host" in script


def test_script_for_a_config_that_names_every_node_groups_host_advertises_those(tmp_path):
    config = test_config(tmp_path, nodes=2)
    config.network.control_host = "10.1.2.3"
    config.network.node_hosts = ["10.1.2.10", "10.1.2.11"]
    path = config.write(tmp_path / "pipeline.toml")
    script = SlurmJob(config=path, nodes=2).script()
    assert "--advertise-host" not in script and "bash -c" not in script
    assert script.rstrip().endswith('-m stemstream node --config "$CONFIG" --workers "$CPUS"')


@pytest.mark.parametrize("args, fragment", [
    (["--nodes", "0"], "--nodes must be at least 1, got 0"),
    (["--nodes", "1", "--tasks-per-node", "0"], "--tasks-per-node must be at least 1"),
    (["--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
    (["--nodes", "1", "--tasks-per-node", "2", "--time", "90"], "--time must look like HH:MM:SS"),
    (["--nodes", "1", "--tasks-per-node", "2", "--time", "1:75:00"], "--time must look like HH:MM:SS"),
    (["--nodes", "1", "--tasks-per-node", "2", "--partition", "a b"], "--partition must be a Slurm name"),
    (["--nodes", "1", "--tasks-per-node", "2", "--account", "x\nsrun rm"], "--account must be a Slurm name"),
    (["--nodes", "2"], "which node groups on other hosts cannot reach; set [network] control_host"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, fragment):
    config = _config(tmp_path, 2)
    assert_one_line_error(stemstream("slurm-script", "--config", config, *args), fragment)


def test_a_missing_or_broken_config_is_a_one_line_error(tmp_path):
    assert_one_line_error(stemstream("slurm-script", "--nodes", "1", "--config", tmp_path / "none.toml"),
                          f"the config file {tmp_path / 'none.toml'} does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline]\nnodes = 0\n")
    assert_one_line_error(stemstream("slurm-script", "--nodes", "1", "--config", bad), "[pipeline] nodes must be 1 to 1024")
    bad.write_text("[network]\ntransport = \"ipc\"\nipc_dir = \"/tmp\"\n")
    assert_one_line_error(stemstream("slurm-script", "--nodes", "2", "--config", bad), "batch job's node groups need \"tcp\"")


def test_submit_without_sbatch_is_a_one_line_error(tmp_path):
    config = _config(tmp_path, 2)
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "stemstream", "slurm-script", "--nodes", "1", "--tasks-per-node", "2",
                             "--config", str(config), "--submit"], capture_output=True, text=True,
                            env={**os.environ, "PATH": str(empty)}, timeout=120)
    assert_one_line_error(result, "sbatch was not found on PATH")


def test_more_node_groups_than_the_config_has_ports_for_is_a_one_line_error(tmp_path):
    # node group i listens on node_base_port + 4 i + module, module 0..3: 65520 leaves room for 4
    config = tmp_path / "pipeline.toml"
    config.write_text("[network]\nnode_base_port = 65520\n[pipeline]\nnodes = 2\n")
    assert SlurmJob(config=config, nodes=1, tasks_per_node=4).check().network.node_base_port == 65520
    with pytest.raises(SlurmError, match="starts 5 node groups, but .* leaves ports for 4"):
        SlurmJob(config=config, nodes=1, tasks_per_node=5).check()
    assert_one_line_error(stemstream("slurm-script", "--nodes", "1", "--tasks-per-node", "5", "--config", config),
                          "leaves ports for 4")


# -- a real Slurm cluster of one node ------------------------------------------------------------------------

SLURM_BINARIES = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/bin/scancel"]


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, one node with 2 CPUs, everything under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.node_name = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.logs = [root / "log" / "slurmctld.log", root / "log" / "slurmd.log", root / "munge" / "munged.log"]

    def start(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "run"):
            (root / sub).mkdir()
        # munged insists: its key readable by its user alone, and the socket's directory
        # searchable by everyone (the Slurm commands connect to it).
        keys = root / "munge"
        keys.mkdir(mode=0o700)
        key = keys / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = root / "run" / "munge.socket"
        self._spawn(["munged", "--foreground", f"--key-file={key}", f"--socket={sock}", f"--log-file={keys / 'munged.log'}",
                     f"--pid-file={root / 'run' / 'munged.pid'}", f"--seed-file={keys / 'munged.seed'}"])
        _wait_for(sock.exists, 20, "munged did not create its socket", self.logs)
        ctl_port = free_port_block(2)
        self.conf.write_text(f"""\
# A one-node cluster on localhost for tests: root runs everything, no cgroups, no accounting.
ClusterName=stemstream-test
SlurmctldHost={self.node_name}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={ctl_port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# the configured CPUs count even where the machine has fewer
SlurmdParameters=config_overrides
NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
""")
        # -D: stay in the foreground, so that these processes are ours to stop; -i: no old state
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", self.node_name])
        _wait_for(lambda: self.slurm("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60,
                  "the Slurm node did not become idle", self.logs)

    def _spawn(self, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{cmd[0]}.out", "ab")
        self.processes.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env))
        out.close()
        time.sleep(0.2)
        if self.processes[-1].poll() is not None:
            raise AssertionError(f"{cmd[0]} exited with code {self.processes[-1].returncode}: "
                                 f"{(self.root / 'log' / f'{cmd[0]}.out').read_text(errors='replace')[-1000:]}")

    def slurm(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=30)

    def job_state(self, job_id: str) -> str:
        """The job's state, "" once Slurm forgot it (finished jobs leave the queue)."""
        return self.slurm("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()

    def cancel(self, job_id: str) -> None:
        self.slurm("scancel", job_id)
        _wait_for(lambda: self.job_state(job_id) in ("", "COMPLETED", "CANCELLED", "FAILED"), 30,
                  f"job {job_id} did not end", self.logs)

    def stop(self) -> None:
        for proc in reversed(self.processes):  # slurmd, slurmctld, then munged
            _stop(proc)


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = install_debian_packages(["slurm-wlm", "munge"], SLURM_BINARIES)
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("not root, so this test cannot run Slurm's daemons as SlurmUser=root")
    # Not under pytest's tmp_path: munged wants every directory above its socket searchable by all.
    root = Path(tempfile.mkdtemp(prefix="stemstream-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_slurm_job_runs_the_node_groups_of_a_streamed_scan(slurm_cluster, tmp_path):
    """Control, writer, gateway and 4 producers here; the 2 node groups as srun tasks of a Slurm
    job; the counted file equals offline counting of the same simulated scan, event for event."""
    seed, dose, scan, shape = 4, 0.002, 1, (16, 16)
    config = test_config(tmp_path, nodes=2, gateway=True)  # fixed thresholds 28 / 1000
    # The node groups advertise the name of their host; listen on whatever address that is.
    config.network.bind_host = "*"
    Path(config.pipeline.output_dir).mkdir()
    config_path = config.write(tmp_path / "pipeline.toml")
    logs = tmp_path / "logs"
    logs.mkdir()
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    control = ControlClient.for_config(config, timeout_s=5.0)
    job_id = None
    node_pids: list[int] = []
    t0 = time.monotonic()
    try:
        _start_role(procs, logs, "control", config_path, "control")
        _start_role(procs, logs, "writer", config_path, "writer")
        _start_role(procs, logs, "gateway", config_path, "gateway")
        for m in range(4):
            _start_role(procs, logs, f"producer-{m}", config_path, "producer", "--module", str(m),
                        "--seed", str(seed), "--dose", str(dose))

        submitted = subprocess.run(
            [sys.executable, "-m", "stemstream", "slurm-script", "--nodes", "1", "--tasks-per-node", "2",
             "--cpus-per-task", "1", "--config", str(config_path), "-o", str(job_dir / "nodes.sh"), "--submit"],
            capture_output=True, text=True, env=slurm_cluster.env, cwd=job_dir, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        print(f"submitted job {job_id} at {time.monotonic() - t0:.1f} s")
        assert job_id.isdigit(), submitted.stdout
        job_log = job_dir / f"stemstream-nodes-{job_id}.out"

        def roles() -> set[str]:
            _alive_check(procs, logs)
            try:
                return set(control.request("status", timeout_s=1.0)["roles"])
            except ControlUnavailable:
                return set()

        expected = {"writer-0", "gateway-0", "node-0", "node-1"} | {f"producer-{m}" for m in range(4)}
        _wait_for(lambda: expected <= roles(), 120, "the roles and the job's node groups did not check in with control",
                  [job_log, *slurm_cluster.logs])
        print(f"every role checked in at {time.monotonic() - t0:.1f} s")
        status = control.request("status")
        node_pids = [status["roles"][f"node-{i}"]["stats"]["pid"] for i in range(2)]
        # each srun task registered with the name of the host it runs on (the batch script asks)
        assert [status["roles"][f"node-{i}"]["host"] for i in range(2)] == [socket.gethostname()] * 2
        assert slurm_cluster.job_state(job_id) == "RUNNING"

        reply = control.request("start_scan", scan_number=scan, scan_shape=list(shape), frames_per_position=1)
        assert reply.get("ok"), reply

        def closed() -> bool:
            _alive_check(procs, logs)
            return control.request("status")["scans"].get(str(scan), {}).get("state") in ("closed", "failed")

        _wait_for(closed, 120, f"scan {scan} did not close", [job_log, *(logs / f"{k}.log" for k in procs)])
        print(f"scan closed at {time.monotonic() - t0:.1f} s")
        status = control.request("status")
        summary = status["scans"][str(scan)]["summary"]
        assert status["scans"][str(scan)]["state"] == "closed"
        n = shape[0] * shape[1]

        # both node groups, i.e. both srun tasks, counted part of the scan (their counters reach
        # control with their next heartbeat, so they may lag the scan's end by one)
        def counted() -> list[int]:
            roles = control.request("status")["roles"]
            return [roles[f"node-{i}"]["stats"]["counters"].get("frames_counted", 0) for i in range(2)]

        _wait_for(lambda: sum(counted()) == n, 10, f"the node groups' counters did not reach {n}")
        assert all(c > 0 for c in counted()), counted()

        # the same scan as raw files, counted offline with the same fixed thresholds
        raw = tmp_path / "raw"
        offline = tmp_path / "offline.h5"
        # the producers simulate scan N with seed + N (see the producer command)
        made = stemstream("simulate", raw, "--scan-shape", f"{shape[0]}x{shape[1]}", "--seed", seed + scan,
                          "--dose", dose, "--scan-number", scan)
        assert made.returncode == 0, made.stderr
        counted_offline = stemstream("count", raw, "-o", offline, "--background-threshold", "28",
                                     "--xray-threshold", "1000")
        assert counted_offline.returncode == 0, counted_offline.stderr
        assert_same_events(summary["path"], offline)
        print(f"compared with offline counting at {time.monotonic() - t0:.1f} s")

        ledger = summary["ledger"]
        assert ledger["frames_expected"] == ledger["frames_complete"] == n
        assert ledger["frames_incomplete"] == 0 and sum(ledger["sectors_rejected"]) == 0
        in_file = read_counted(summary["path"]).metadata["stemstream"]["ledger"]
        assert in_file["frames_complete"] == n and in_file["frames_incomplete"] == 0

        # control's shutdown reaches the node groups through their heartbeats: the job ends by itself
        control.request("shutdown", timeout_s=2.0)
        _wait_for(lambda: slurm_cluster.job_state(job_id) in ("", "COMPLETED", "COMPLETING"), 60,
                  f"job {job_id} did not end after the shutdown", [job_log])
        assert "starts 2 node group(s)" in job_log.read_text()
    finally:
        control.close()
        if job_id:
            slurm_cluster.cancel(job_id)
        for pid in node_pids:  # gone with the job; make sure, without hitting a reused pid
            try:
                proc = psutil.Process(pid)
                if "node" in proc.cmdline() and "stemstream" in proc.cmdline():
                    proc.kill()
            except psutil.Error:
                pass
        for proc in procs.values():
            _stop(proc, 5.0)


def test_a_refused_submission_is_a_one_line_error(slurm_cluster, tmp_path):
    config = _config(tmp_path, 2)
    result = subprocess.run([sys.executable, "-m", "stemstream", "slurm-script", "--nodes", "1", "--tasks-per-node",
                             "2", "--config", str(config), "--partition", "nosuch", "--submit"],
                            capture_output=True, text=True, env=slurm_cluster.env, cwd=tmp_path, timeout=60)
    assert_one_line_error(result, "sbatch refused the job", "partition")
