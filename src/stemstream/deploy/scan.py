"""Starting one scan through control and waiting for the writer to close it.

Shared by the embedded launcher (deploy.local) and ``stemstream scan``, which talks to a pipeline
whose roles run on other hosts: the only thing either needs is control's address.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stemstream.core.detector import MODULES
from stemstream.transport.control_client import ControlClient, ControlUnavailable


class PipelineError(RuntimeError):
    """The pipeline could not start or a scan could not finish."""


# A status request that times out once is not a dead control: on a loaded machine a reply can be
# late. Only this many seconds without any answer end the wait.
CONTROL_PATIENCE_S = 10.0


def required_roles(config) -> set[str]:
    """The roles (control's keys, e.g. "node-1") a scan needs checked in, from the config."""
    roles = {"writer-0"} | {f"node-{i}" for i in range(config.pipeline.nodes)}
    roles |= {f"producer-{m}" for m in MODULES}
    if config.pipeline.gateway:
        roles |= {f"gateway-{g}" for g in range(config.network.gateways)}
    return roles


def live_roles(status: dict, config) -> set[str]:
    """Roles whose last heartbeat is recent (the same patience the roles use for each other)."""
    limit = config.flow.silent_after_s
    return {key for key, role in status.get("roles", {}).items() if role.get("age_s", 0.0) <= limit}


def wait_for_roles(control: ControlClient, roles: set[str], config, timeout_s: float,
                   check: Callable[[], None] | None = None, where: str = "") -> None:
    """Wait until every role in ``roles`` has a recent heartbeat; raises PipelineError naming the
    missing ones after ``timeout_s``, ControlUnavailable if control never answers. ``check`` is
    called while waiting (the local launcher raises there when a role's process died); ``where``
    is added to the error (where the logs are)."""
    _wait(control, lambda status: (roles - live_roles(status, config), set()), timeout_s, check, where)


def roles_a_scan_waits_for(status: dict, config) -> tuple[set[str], set[str]]:
    """(roles a scan cannot start without, node groups worth waiting for) by control's status.
    A scan needs the writer, every producer and gateway, and one node group alive; it runs on the
    node groups alive when it starts (control's choice), so of the others only those control has
    never heard of are worth waiting for (still starting), never one that went silent (dead)."""
    live = live_roles(status, config)
    needed = required_roles(config)
    nodes = {key for key in needed if key.startswith("node-")}
    missing = needed - nodes - live
    if not any(key.startswith("node-") for key in live):
        missing |= nodes
    return missing, nodes - set(status.get("roles", {}))


def wait_for_scan_roles(control: ControlClient, config, timeout_s: float) -> set[str]:
    """Wait until a scan can start (:func:`roles_a_scan_waits_for`); the configured node groups it
    will run without (not alive). PipelineError after ``timeout_s`` when it cannot start."""
    status = _wait(control, lambda status: roles_a_scan_waits_for(status, config), timeout_s)
    return required_roles(config) - live_roles(status, config)


def _wait(control: ControlClient, waiting_for: Callable[[dict], tuple[set[str], set[str]]], timeout_s: float,
          check: Callable[[], None] | None = None, where: str = "") -> dict:
    """Ask control's status until ``waiting_for(status)`` gives (roles needed, roles hoped for)
    both empty, or, at ``timeout_s``, the needed ones; control's last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        try:
            status = control.request("status", timeout_s=max(min(2.0, deadline - time.monotonic()), 0.5))
            missing, hoped = waiting_for(status)
        except ControlUnavailable:
            if time.monotonic() > deadline:
                raise
            missing, hoped = {"control"}, set()
        late = time.monotonic() > deadline
        if not missing and (not hoped or late):
            return status
        if late:
            raise PipelineError(f"roles not checked in with control after {timeout_s:g} s: "
                                f"{', '.join(sorted(missing))}{where}")
        time.sleep(0.1)


def start_and_wait(control: ControlClient, scan_number: int, scan_shape: tuple[int, int],
                   frames_per_position: int = 1, progress: Callable[[dict], None] | None = None,
                   timeout_s: float = 600.0, resume: bool = False, file_name: str | None = None,
                   check: Callable[[], None] | None = None) -> dict:
    """Start a scan through control and wait until the writer closed it; returns its summary with
    ``state`` ("closed" or "failed") added.

    scan_shape is (rows, cols). ``check`` is called while waiting (the local launcher raises there
    when one of its processes died); ``progress`` gets control's status a few times a second.
    Raises PipelineError when control refuses the scan, stops answering or the scan outlasts
    ``timeout_s``; ControlUnavailable when control does not answer the start request.
    """
    request = {"scan_number": scan_number, "scan_shape": list(scan_shape),
               "frames_per_position": frames_per_position, "resume": resume}
    if file_name:
        request["file_name"] = file_name
    reply = control.request("start_scan", **request)
    if not reply.get("ok"):
        raise PipelineError(f"control refused scan {scan_number}: {reply.get('error')}")
    deadline = time.monotonic() + timeout_s
    last_answer = time.monotonic()
    while time.monotonic() < deadline:
        if check:
            check()
        try:
            status = control.request("status", timeout_s=2.0)
        except ControlUnavailable as exc:
            if time.monotonic() - last_answer > CONTROL_PATIENCE_S:
                raise PipelineError(f"control stopped answering while scan {scan_number} ran ({exc})") from None
            continue
        last_answer = time.monotonic()
        state = status["scans"].get(str(scan_number), {})
        if progress:
            progress(status)
        if state.get("state") in ("closed", "failed"):
            summary = state.get("summary") or {}
            summary["state"] = state["state"]
            return summary
        time.sleep(0.1)
    raise PipelineError(f"scan {scan_number} did not finish within {timeout_s:g} s")
