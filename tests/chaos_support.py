"""Chaos: a session of scans through a pipeline whose every role is its own process (started from
one config file, as on separate hosts), while a seeded random schedule kills (SIGKILL), stops
(SIGSTOP, later SIGCONT) and restarts roles at random moments and throws forged and garbage
messages at their ports.

After each scan its file is compared with a clean run of the same scan number (the producers
simulate with a fixed seed and the thresholds are fixed, so a clean run's file is reproducible):
it must be identical (every frame's events, every /analysis array), or its ledger must account
for every frame that differs and ``stemstream replay`` of the scan's spill must make it identical.
Anything else fails the trial, which prints its seed and schedule: the same seed draws the same
schedule (``bench_chaos.py --seed SEED --chaos-runs 1``). docs/reliability.md, "Chaos", has the
figures. Used by tests/integration/test_chaos.py (short) and benchmarks/bench_chaos.py (long).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from chaos_faults import Fault, Injector, draw_schedule
from pipeline_support import test_config
from stemstream.core.detector import N_MODULES
from stemstream.deploy.kernels import compile_kernels
from stemstream.deploy.local import LocalPipeline, ProducerSource
from stemstream.deploy.scan import PipelineError
from stemstream.formats.sparse_h5 import read_counted
from stemstream.pipeline.spill import spill_directory
from stemstream.pipeline.writer.files import incomplete_path
from stemstream.transport.control_client import ControlUnavailable

GOOD = ("exact", "recovered")  # the outcomes a trial may have


def chaos_config(work: Path, nodes: int = 2, shared_memory: bool = False):
    """The session's config: test_config's free ports, fixed thresholds and short timeouts, with
    blocks of 16 frames and failover after 2 s of silence."""
    config = test_config(work, nodes=nodes, shared_memory=shared_memory)
    config.pipeline.block_frames = 16
    config.flow.dead_after_s = 2.0
    config.flow.backpressure_timeout_s = 2.0
    config.flow.scan_timeout_s = 30.0
    return config.validate()


class ChaosPipeline(LocalPipeline):
    """A LocalPipeline whose roles the chaos kills, stops and starts again by their process key."""

    def start_role(self, key: str) -> None:
        family, _, index = key.partition("-")
        if family == "producer":
            self._start(key, ["producer", "--module", index, *self.source.arguments()])
        elif family in ("node", "gateway"):
            getattr(self, f"start_{family}")(int(index))
        else:
            getattr(self, f"start_{family}")()

    def alive(self, key: str) -> bool:
        proc = self.processes.get(key)
        return proc is not None and proc.poll() is None

    def signal(self, key: str, sig: int) -> bool:
        """Send ``sig`` to the role's process; False when it is not running."""
        if not self.alive(key):
            return False
        if sig == signal.SIGKILL:
            self.kill(key)
        else:
            os.kill(self.processes[key].pid, sig)
        return True

    def exited_by_themselves(self) -> dict[str, str]:
        """Roles whose process ended without being killed: key -> exit code and last log line.
        They are forgotten here (started again by the caller)."""
        gone = {}
        for key, proc in list(self.processes.items()):
            if not key.startswith("killed") and proc.poll() is not None:
                tail = (self.log_dir / f"{key}.log").read_text(errors="replace").strip().splitlines()[-1:]
                gone[key] = f"exit code {proc.returncode}: {' '.join(tail)[:300]}"
                self.processes[f"killed-{key}"] = self.processes.pop(key)
        return gone

    def stop(self, timeout_s: float = 10.0) -> None:
        for proc in self.processes.values():  # a stopped role cannot hear the shutdown
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        super().stop(timeout_s)


@dataclass
class TrialResult:
    trial: int
    seed: int
    scan: int
    faults: list[Fault]
    injected: int = 0
    outcome: str = ""  # exact, recovered, unrecovered, failed, silent loss, wrong analyses, destroyed, hung, refused
    differing: int = 0  # frames whose events differ from the clean run's (before any replay)
    not_complete: int = 0  # frames the ledger says are not complete (incomplete or missing)
    silently_lost: int = 0  # differing frames the ledger does not account for
    analyses_wrong: bool = False  # /analysis differs from the clean run's, the ledger says all is whole
    destroyed: int = 0  # files that were whole (or this scan's, finished) and were lost or changed
    replayed: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # anything that fails the trial
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.outcome in GOOD and not self.problems and not self.silently_lost and not self.analyses_wrong
                and not self.destroyed)

    def line(self) -> str:
        text = (f"trial {self.trial:3d} seed {self.seed} scan {self.scan}: {self.outcome:<11} faults {self.injected} "
                f"differing {self.differing} not_complete {self.not_complete} silently_lost {self.silently_lost} "
                f"destroyed {self.destroyed}{' replayed' if self.replayed else ''} ({self.seconds:.0f} s)")
        details = [f"  schedule: {'; '.join(map(str, self.faults))}"] if not self.ok else []
        details += [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join([text, *details])


def fingerprint(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced (inode) or written to (size, modification time)."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def analysis_arrays(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as f:
        if "analysis" in f:
            f["analysis"].visititems(
                lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


class Reference:
    """A clean run's file: its frames and /analysis arrays, read once."""

    def __init__(self, path: Path):
        self.path = path
        self.frames = read_counted(path).frames.reshape(-1)
        self.analyses = analysis_arrays(path)

    def compare(self, path: Path) -> tuple[int, list[str], dict]:
        """(frames whose events differ, /analysis arrays that differ, the file's ledger)."""
        scan = read_counted(path)
        frames = scan.frames.reshape(-1)
        if len(frames) != len(self.frames):
            return len(self.frames), ["(scan shape)"], {}
        differing = sum(not np.array_equal(a, b) for a, b in zip(frames, self.frames))
        ours = analysis_arrays(path)
        bad = sorted(set(ours) ^ set(self.analyses))
        bad += [k for k in set(ours) & set(self.analyses) if ours[k].shape != self.analyses[k].shape
                or not np.allclose(ours[k], self.analyses[k], rtol=1e-12, atol=0, equal_nan=True)]
        ledger = scan.metadata.get("stemstream", {}).get("ledger", {})
        return differing, sorted(bad), ledger


class ChaosSession:
    """One pipeline session: clean runs of scans 1..K, then trials (scan k again, under a
    schedule of faults), each judged against the clean run of its number."""

    def __init__(self, work: Path, shape: tuple[int, int], rate: float, classes: tuple[str, ...],
                 most_faults: int = 3, nodes: int = 2, shared_memory: bool = False):
        self.work, self.shape, self.rate, self.classes = Path(work), shape, rate, classes
        self.work.mkdir(parents=True, exist_ok=True)
        self.most_faults, self.nodes = most_faults, nodes
        self.config = chaos_config(self.work, nodes, shared_memory)
        self.out = Path(self.config.pipeline.output_dir)
        self.spill_root = Path(self.config.pipeline.spill_dir)
        self.replay_config_path = self._replay_config()
        self.source = ProducerSource(seed=11, rate=rate)
        self.pipeline = ChaosPipeline(self.config, self.work / "roles", self.source)
        self.injector = Injector(self.pipeline.config)
        self.references: dict[int, Reference] = {}
        self.watched: dict[Path, tuple] = {}  # every finished file's fingerprint: none may change
        self.stopped: dict[str, object] = {}  # key -> the stopped process
        self.replay_command = [sys.executable, "-m", "stemstream", "replay"]  # another one: to try a fix

    def _replay_config(self) -> Path:
        """``stemstream replay``'s config: the same settings on ports, state and spill of its own
        (it starts a pipeline of its own beside the session's)."""
        config = chaos_config(self.work / "replay", self.nodes)
        config.pipeline.state_file = "control.state"  # in the replay's own work directory
        config.pipeline.spill_dir = str(self.work / "replay" / "spill")
        return config.write(self.work / "replay.toml")

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role's process key."""
        return ("control", "writer", *(f"node-{i}" for i in range(self.nodes)), "gateway-0",
                *(f"producer-{m}" for m in range(N_MODULES)))

    @property
    def frames(self) -> int:
        return self.shape[0] * self.shape[1]

    def __enter__(self) -> ChaosSession:
        compile_kernels(self.config, self.source)
        self.pipeline.start(timeout_s=120)
        return self

    def __exit__(self, *exc) -> None:
        self.injector.close()
        self.pipeline.stop()

    # -- clean runs ---------------------------------------------------------------------------------

    def clean_runs(self, numbers: range) -> None:
        """The reference file of each scan number: a run without faults, every frame complete."""
        for number in numbers:
            summary = self.pipeline.run_scan(number, self.shape, timeout_s=180)
            ledger = summary.get("ledger", {})
            if summary.get("state") != "closed" or ledger.get("frames_complete") != self.frames:
                raise RuntimeError(f"the clean run of scan {number} is not whole: {summary.get('state')} {ledger}")
            if spill_directory(self.spill_root, number).exists():
                raise RuntimeError(f"the clean run of scan {number} spilled (the machine is too slow for rate {self.rate})")
            path = Path(summary["path"])
            self.references[number] = Reference(path)
            self.watched[path] = fingerprint(path)

    # -- one trial ----------------------------------------------------------------------------------

    def trial(self, trial: int, seed: int, number: int, faults: bool = True,
              schedule: list[Fault] | None = None) -> TrialResult:
        """Scan ``number`` again under the schedule ``seed`` draws (none with ``faults`` False),
        or under ``schedule`` (a trial's, with faults left out, to find which one did it)."""
        window = 1.2 * self.frames / self.rate if self.rate else 2.0
        if schedule is None:
            schedule = draw_schedule(seed, self.classes, window, self.nodes, self.most_faults) if faults else []
        result = TrialResult(trial, seed, number, schedule)
        t0 = time.monotonic()
        self._set_aside_spill(number, result)
        self._heal(result)  # whatever the last trial left running (a forged shutdown, say) is started again
        spec = self._start_scan(number, result)
        if spec is not None:
            whole = self.out / spec["file_name"]
            seen = self._drive(number, schedule, whole, result)
            hung = result.outcome == "hung"
            if hung:  # a stuck role would hang every later scan: start them all again
                for key in [k for k in self.pipeline.processes if not k.startswith("killed")]:
                    self.pipeline.signal(key, signal.SIGKILL)
                result.notes.append("every role killed and started again after the hang")
            self._heal(result)
            self._judge(number, whole, seen, result)
            result.outcome = "hung" if hung else result.outcome
        self._check_watched(result)
        result.seconds = time.monotonic() - t0
        return result

    def _set_aside_spill(self, number: int, result: TrialResult) -> None:
        spill = spill_directory(self.spill_root, number)
        if spill.exists():
            spill.rename(spill.with_name(f"{spill.name}.left-{result.trial}"))
            result.notes.append(f"an earlier spill of scan {number} was set aside")

    def _start_scan(self, number: int, result: TrialResult) -> dict | None:
        """Start the scan (retried while control is not back or refuses for a moment)."""
        deadline, reply = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            try:
                reply = self.pipeline.control.request("start_scan", scan_number=number, scan_shape=list(self.shape))
            except ControlUnavailable as exc:
                reply = {"error": str(exc)}
            if reply.get("ok"):
                return reply["scan"]
            time.sleep(0.5)
        result.outcome = "refused"
        result.problems.append(f"control did not start the scan in 30 s: {reply.get('error')}")
        return None

    def _scan_state(self, number: int) -> tuple[str | None, dict]:
        try:
            reply = self.pipeline.control.request("get_scan", timeout_s=1.0, scan=number)
        except ControlUnavailable:
            return None, {}
        return reply.get("state"), reply.get("summary") or {}

    def _drive(self, number: int, schedule: list[Fault], whole: Path, result: TrialResult) -> dict[Path, tuple]:
        """Run the schedule while the scan streams; returns the fingerprint of each of the scan's
        file names when a file first appeared there (what must not change afterwards)."""
        t0 = time.monotonic()
        timed = sorted(((t0 + f.at_s, i, f) for i, f in enumerate(schedule) if not f.kind.startswith("kill_at")),
                       key=lambda x: x[:2])
        at_close = [f for f in schedule if f.kind.startswith("kill_at")]
        later: list[tuple[float, str, str]] = []  # (when, "restart"|"resume", key)
        seen: dict[Path, tuple] = {}
        names = (whole, incomplete_path(whole))
        state, next_poll, deadline = "running", 0.0, t0 + 2 * self.config.flow.scan_timeout_s
        while timed or later or state not in ("closed", "failed") or (at_close and not seen):
            now = time.monotonic()
            if now > deadline:
                result.outcome = "hung"
                result.problems.append(f"scan {number} still {state} after {now - t0:.0f} s")
                break
            while timed and timed[0][0] <= now:
                self._inject(timed.pop(0)[2], number, result, later)
            for path in names:
                if path not in seen and path.exists():
                    seen[path] = fingerprint(path)
                    for fault in at_close:
                        self._inject(fault, number, result, later)
                    at_close = []
            for item in [x for x in later if x[0] <= now]:
                later.remove(item)
                self._follow_up(item[1], item[2])
            if now >= next_poll:
                state = self._scan_state(number)[0] or state
                next_poll = now + 0.2
                if state in ("closed", "failed") and not seen:
                    at_close = []  # closed without a file at either name: nothing to kill it at
            time.sleep(0.02)
        return seen

    def _inject(self, fault: Fault, number: int, result: TrialResult, later: list) -> None:
        action = fault.kind.split(":")[0]
        if action in ("kill", "kill_at_close", "stop"):
            if fault.target in self.stopped and action == "stop":
                return  # already stopped: not injected
            sig = signal.SIGSTOP if action == "stop" else signal.SIGKILL
            if not self.pipeline.signal(fault.target, sig):
                return
            if action == "stop":
                self.stopped[fault.target] = self.pipeline.processes[fault.target]
            else:
                self.stopped.pop(fault.target, None)
            later.append((time.monotonic() + fault.hold_s, "resume" if action == "stop" else "restart", fault.target))
        else:
            up = self.pipeline.alive("control") and "control" not in self.stopped
            result.problems += self.injector.send(fault, number, control_up=up)
        result.injected += 1

    def _follow_up(self, what: str, key: str) -> None:
        if what == "resume":
            proc = self.stopped.pop(key, None)
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        elif not self.pipeline.alive(key):
            self.pipeline.start_role(key)

    def _heal(self, result: TrialResult, tries: int = 5) -> None:
        """Every role running again (stopped ones resumed, dead ones started) and checked in; a
        role that exited without being killed is a problem of the trial."""
        for key in list(self.stopped):
            self._follow_up("resume", key)
        for attempt in range(tries):
            exited = self.pipeline.exited_by_themselves()
            for key, why in exited.items():
                result.problems.append(f"{key} exited by itself ({why})")
            if exited:
                time.sleep(3.0)  # a control told to shut down answers "shutdown" for 2 s more
            for key in self.roles:
                if not self.pipeline.alive(key):
                    self.pipeline.start_role(key)
            try:
                self.pipeline.wait_for_roles(self.pipeline.expected_roles(), timeout_s=120)
                time.sleep(1.0)  # roles told to shut down leave a moment after their heartbeat
                if all(self.pipeline.alive(k) for k in self.roles):
                    return
            except (PipelineError, ControlUnavailable) as exc:
                if attempt == tries - 1:
                    raise RuntimeError(f"the pipeline could not be made whole after trial {result.trial}: {exc}") from None
        else:
            raise RuntimeError(f"the roles kept exiting after trial {result.trial}")

    # -- judging ------------------------------------------------------------------------------------

    def _judge(self, number: int, whole: Path, seen: dict[Path, tuple], result: TrialResult) -> None:
        state, summary = self._scan_state(number)
        names = self._settled_file(whole, state, summary, result)
        for path, before in seen.items():  # a finished file is never replaced (before a replay)
            if not path.exists() or fingerprint(path) != before:
                result.destroyed += 1
                result.problems.append(f"{path.name} was finished, then {'changed' if path.exists() else 'removed'}")
        if len(names) != 1:
            self._no_single_file(state, summary, names, result)
            return
        reference = self.references[number]
        differing, analyses, ledger = reference.compare(names[0])
        result.differing = differing
        result.not_complete = int(ledger.get("frames_expected", self.frames)) - int(ledger.get("frames_complete", 0))
        if not differing and not analyses:
            result.outcome = "exact"
            if names[0] != whole or result.not_complete:
                result.notes.append(f"the file is exact, yet named {names[0].name} with a ledger of "
                                    f"{result.not_complete} frame(s) not complete")
        else:
            result.notes.append(f"ledger: {_brief(ledger)}")
            self._account(differing, analyses, ledger, result)
            if result.outcome == "unrecovered":  # what the ledger names, a replay must bring back
                self._replay(number, whole, reference, result)
        for path in (whole, incomplete_path(whole)):
            if path.exists():
                self.watched[path] = fingerprint(path)

    def _settled_file(self, whole: Path, state, summary: dict, result: TrialResult, grace_s: float = 20.0) -> list[Path]:
        """The scan's file(s) once control says it ended; a file that appears only after that, or
        a summary naming another file, is a problem of the trial."""
        names = (whole, incomplete_path(whole))
        path = summary.get("path")
        if state == "closed" and path and Path(path) not in names:
            result.problems.append(f"control says the scan closed as {Path(path).name}, not {whole.name} or its "
                                   "incomplete name")
        t0 = time.monotonic()
        while not any(p.exists() for p in names) and time.monotonic() - t0 < grace_s:
            time.sleep(0.2)
        found = [p for p in names if p.exists()]
        if found and time.monotonic() - t0 > 0.5:
            result.problems.append(f"control said the scan was {state}; its file {found[0].name} appeared "
                                   f"{time.monotonic() - t0:.0f} s later")
        return found

    def _no_single_file(self, state, summary: dict, names: list[Path], result: TrialResult) -> None:
        if names:
            result.outcome = "destroyed"
            result.problems.append(f"both {names[0].name} and {names[1].name} exist")
        elif state == "failed":
            result.outcome = "failed"
            result.notes.append(f"failed, said so: {summary.get('error', summary)}")
        else:
            result.outcome = "destroyed" if state == "closed" else result.outcome or "hung"
            result.destroyed += state == "closed"
            result.problems.append(f"no file, scan {state}: {summary.get('path', '')}")

    def _account(self, differing: int, analyses: list[str], ledger: dict, result: TrialResult,
                 when: str = "") -> None:
        """A file that differs from the clean run's must say so in its ledger, frame for frame; its
        analyses may differ only where frames do."""
        not_complete = int(ledger.get("frames_expected", self.frames)) - int(ledger.get("frames_complete", 0))
        lost = max(differing - not_complete, 0)
        result.silently_lost = max(result.silently_lost, lost)
        result.analyses_wrong |= bool(analyses and not not_complete)
        if lost or (analyses and not not_complete):
            result.outcome = "silent loss" if lost else "wrong analyses"
            result.problems.append(f"{when}{differing} frame(s) differ, the ledger says {not_complete} are not "
                                   f"complete; /analysis differs: {analyses[:4]}; ledger {_brief(ledger)}")
        else:
            result.outcome = "unrecovered"

    def _replay(self, number: int, whole: Path, reference: Reference, result: TrialResult) -> None:
        """``stemstream replay`` of the scan's spill; the file must then be the clean run's."""
        spill = spill_directory(self.spill_root, number)
        if not spill.exists():
            result.problems.append(f"{result.differing} frame(s) differ and nothing was spilled to replay")
            return
        self._wait_spill_settled(spill)
        cmd = [*self.replay_command, str(spill), "-o", str(self.out), "--config", str(self.replay_config_path)]
        t0 = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        result.notes.append(f"replay took {time.monotonic() - t0:.0f} s")
        result.replayed = True
        names = [p for p in (whole, incomplete_path(whole)) if p.exists()]
        if run.returncode or names != [whole]:
            said = [line for line in (run.stdout + run.stderr).splitlines() if line.strip() and line.strip()[0] not in "│╭╰┃┏┗"]
            result.problems.append(f"replay exit code {run.returncode}, files after it {[p.name for p in names]}: "
                                   f"{' | '.join(said[-3:])[:400]}")
        if len(names) == 1:
            differing, analyses, ledger = reference.compare(names[0])
            if not differing and not analyses:
                result.outcome = "recovered"
            else:
                self._account(differing, analyses, ledger, result, when="after the replay ")
                if result.outcome == "unrecovered":
                    result.problems.append(f"after the replay {differing} frame(s) still differ (ledger: "
                                           f"{_brief(ledger)}); /analysis differs: {analyses[:4]}")

    def _wait_spill_settled(self, spill: Path, quiet_s: float = 2.0, timeout_s: float = 60.0) -> None:
        """Until the producers stopped writing the spill (its files unchanged for ``quiet_s``)."""
        deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
        while time.monotonic() < deadline:
            sizes = sorted((p.name, p.stat().st_size) for p in spill.iterdir())
            if sizes != last:
                last, since = sizes, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.2)

    def _check_watched(self, result: TrialResult) -> None:
        """No earlier file (clean runs', earlier trials') was removed or changed."""
        for path, digest in list(self.watched.items()):
            if not path.exists() or fingerprint(path) != digest:
                result.destroyed += 1
                result.problems.append(f"an earlier file {path.name} was {'changed' if path.exists() else 'removed'}")
                del self.watched[path]


def _brief(ledger: dict) -> str:
    keys = ("frames_expected", "frames_complete", "frames_incomplete", "frames_missing", "frames_spilled",
            "sectors_lost", "sectors_rejected", "node_groups_missing")
    return ", ".join(f"{k}={ledger[k]}" for k in keys if k in ledger)


def summarize(results: list[TrialResult]) -> dict:
    """The session's totals: what the benchmark prints and docs/reliability.md quotes."""
    outcomes = dict(Counter(r.outcome for r in results))
    return {"trials": len(results), "faults_injected": sum(r.injected for r in results),
            "exact": outcomes.get("exact", 0), "recovered_by_replay": outcomes.get("recovered", 0),
            "frames_silently_lost": sum(r.silently_lost for r in results),
            "analyses_silently_wrong": sum(r.analyses_wrong for r in results),
            "files_destroyed": sum(r.destroyed for r in results), "failed_trials": sum(not r.ok for r in results),
            "outcomes": outcomes}
