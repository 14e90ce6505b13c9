"""Stopping ``stemstream run`` and ``demo`` as a person does: Ctrl-C once, Ctrl-C twice, Enter at the
demo's prompt; each time nothing the command started (process, socket, shared memory) outlives it,
and its logs folder is removed or kept as it says. Real subprocesses, real signals, a real
pseudo-terminal for the demo."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import tomllib
import urllib.request
from pathlib import Path

import psutil
import pytest
from pipeline_support import wait_for

from stemstream.deploy.kernels import first_compile
from stemstream.deploy.local import LocalPipeline
from stemstream.deploy.scan import PipelineError
from stemstream.deploy.settings import load_settings

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Command:
    """``stemstream ARGS`` in a subprocess whose temporary files (the run's work directory) go to
    ``tmp``; its children, and the shared-memory folder they use, as seen while it runs."""

    def __init__(self, tmp: Path, *args, terminal: bool = False):
        self.tmp = tmp
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "stemstream", *map(str, args)]
        self.master = None
        if terminal:  # stdin and stdout a terminal of 160 columns, as a person's
            self.master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
            self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=tmp, env=env)
            os.close(slave)
        else:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         cwd=tmp, env=env)
            os.set_blocking(self.proc.stdout.fileno(), False)
        self.raw = b""
        self.children: list[psutil.Process] = []
        self.shm_dir: Path | None = None

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def read(self) -> str:
        fd = self.master if self.master is not None else self.proc.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            self.raw += chunk
        return self.text

    def wait_for_output(self, pattern: str, timeout_s: float = 240) -> re.Match:
        return wait_for(lambda: re.search(pattern, self.read()) or self._still_running(), timeout_s,
                        f"{pattern!r} in the output")

    def _still_running(self) -> None:
        assert self.proc.poll() is None, f"exited {self.proc.returncode} early:\n{self.read()}"

    def note_children(self) -> None:
        """The roles it started, and their shared-memory folder (from their config)."""
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        config = next(arg for c in self.children for arg in c.cmdline() if arg.endswith("pipeline.toml"))
        shm = tomllib.loads(Path(config).read_text())["network"].get("shm_dir")
        self.shm_dir = Path(shm) if shm and shm.startswith("/dev/shm/stemstream-") else None

    def wait_exit(self, timeout_s: float) -> float:
        """Seconds until it exited (at most ``timeout_s``)."""
        t0 = time.monotonic()
        while self.proc.poll() is None:
            self.read()
            if time.monotonic() - t0 > timeout_s:
                self.proc.kill()
                pytest.fail(f"still running {timeout_s} s later:\n{self.read()}")
            time.sleep(0.02)
        self.read()
        return time.monotonic() - t0

    def assert_nothing_left(self) -> None:
        """No child process, shared memory or socket of the run outlives the command."""
        assert self.children, "no children were seen"
        alive = [c.pid for c in self.children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"children still running: {alive}"
        if self.shm_dir is not None:
            assert not self.shm_dir.exists(), f"{self.shm_dir} outlived the command"
        assert not list(self.tmp.glob("stemstream-run-*/sockets")), "the run's sockets outlived it"

    def work_dirs(self) -> list[Path]:
        return list(self.tmp.glob("stemstream-run-*"))


def start_scan_and_interrupt(tmp: Path, signals: int) -> tuple[Command, float]:
    """A paced 32 x 32 scan (about 10 s), interrupted ``signals`` times once its file is open;
    returns the command and the seconds from the last signal to its exit."""
    out = tmp / "out"
    command = Command(tmp, "run", "--simulate", "32x32", "--rate", "100", "--no-dashboard", "-o", out)
    wait_for(lambda: list(out.glob("*.partial")) or command._still_running(), 240, "the scan's file opened")
    command.note_children()
    for k in range(signals):
        if k:
            time.sleep(0.2)
        command.proc.send_signal(signal.SIGINT)
    return command, command.wait_exit(30)


@pytest.mark.slow
def test_one_ctrl_c_stops_every_role_and_says_where_the_file_is(tmp_path):
    command, seconds = start_scan_and_interrupt(tmp_path, 1)
    text = command.text
    assert command.proc.returncode == 130, text
    # The roles are stopped (or killed) by 1.5 s; a writer still closing the file may take longer
    # on a loaded machine. Before the fix, the producers ran on until a 10 s timeout.
    assert seconds < 10, text
    stopped = re.search(r"stopped every role in ([0-9.]+) s", text)
    assert stopped, text
    where = re.search(r"scan 1: (\S+\.h5): ([0-9,]+) of 1,024 frames complete, ([0-9,]+) missing", text)
    assert where, text
    assert Path(where.group(1)).exists()
    if where.group(3) != "0":
        assert where.group(1).endswith(".incomplete.h5"), text
    command.assert_nothing_left()
    # interrupted: the logs are kept, and named
    logs = re.search(r"logs: (\S+)", text)
    assert logs and (Path(logs.group(1)) / "writer.log").exists(), text
    print(f"one Ctrl-C: exit {seconds:.2f} s after it; roles stopped in {stopped.group(1)} s")


@pytest.mark.slow
def test_second_ctrl_c_kills_every_role_at_once_and_removes_their_shared_memory(tmp_path):
    command, seconds = start_scan_and_interrupt(tmp_path, 2)
    text = command.text
    assert command.proc.returncode == 130, text
    assert seconds < 5, text
    assert "second Ctrl-C: every role killed" in text, text
    command.assert_nothing_left()
    assert re.search(r"logs: \S+", text), text
    print(f"two Ctrl-C: exit {seconds:.2f} s after the second")


@pytest.mark.slow
def test_demo_on_a_terminal_paces_the_scan_and_keeps_the_dashboard_up_until_enter(tmp_path):
    command = Command(tmp_path, "demo", "--scan-shape", "32x32", "--pace", "4", terminal=True)
    url = command.wait_for_output(r"dashboard: (http://\S+/)").group(1)
    started = time.monotonic()
    command.note_children()
    assert "frames complete" not in command.text  # the address comes before the scan
    command.wait_for_output(r"press Enter")
    assert time.monotonic() - started > 3.5, "the scan was not paced"
    assert "every frame accounted for" in command.text
    time.sleep(1)  # the prompt, not the end of the scan, keeps it up
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200
    assert command.proc.poll() is None
    os.write(command.master, b"\n")
    command.wait_exit(60)
    assert command.proc.returncode == 0, command.text
    command.assert_nothing_left()
    assert not command.work_dirs(), "a successful demo leaves no logs behind"
    assert len(list(tmp_path.glob("FOURD_*.h5"))) == 1


def test_a_role_that_exits_is_named_with_the_logs_folder(tmp_path):
    config = load_settings(None)
    config.pipeline.output_dir = str(tmp_path)
    pipeline = LocalPipeline(config, tmp_path / "work")
    with open(pipeline.log_dir / "writer.log", "w") as log:
        pipeline.processes["writer"] = subprocess.Popen([sys.executable, "-c", "print('cannot go on'); exit(3)"],
                                                        stdout=log)
    pipeline.processes["writer"].wait(30)
    with pytest.raises(PipelineError, match=re.escape(str(pipeline.log_dir))) as error:
        pipeline.wait_for_roles({"writer-0"}, timeout_s=5)
    assert "writer exited with code 3: cannot go on" in str(error.value)
    pipeline.stop()


def test_the_compile_notice_comes_only_when_numba_compiles():
    from numba import njit

    @njit(cache=False)
    def twice(x):
        return 2 * x

    calls = []
    with first_compile(lambda: calls.append(1)):
        assert twice(2) == 4  # compiled here
        assert twice(3) == 6
    assert calls == [1]
    with first_compile(lambda: calls.append(2)):
        assert twice(4) == 8  # already compiled: no notice
    assert calls == [1]
