"""The pipeline's configuration: one TOML file shared by every role, plus command-line overrides.

Defaults put every role on 127.0.0.1, so the embedded run needs no file at all. Unknown settings,
wrong types and impossible values are refused with one sentence naming the setting (ConfigError).

```toml
[network]
host = "127.0.0.1"          # default for every role below
control_port = 5550
writer_port = 5551
gateway_port = 5552         # the gateway listens on 4 ports: one per module, gateway_port + m
node_base_port = 5560       # node group i listens on node_base_port + 4 i + m, m the module
dashboard_port = 8000       # the web dashboard (stemstream serve)
# control_host / gateway_host / writer_host / node_hosts = ["10.0.0.5", ...]: per-role hosts
# gateway_hosts = ["recv0", "recv1"]: several gateways, module m through gateway m % len (at most 4)
transport = "tcp"           # or "ipc" (every role on one host; needs ipc_dir)
shared_memory = false       # every role on one host: blocks through shm_dir ("/dev/shm")

[pipeline]
nodes = 2                   # node groups
gateway = true
block_frames = 32           # frames per routing block (the unit sent to one node group)
output_dir = "."
spill_dir = "spill"
state_file = "stemstream-control.state"  # control's scans, kept across a restart of control ("": not kept)

[counting]                  # fixed thresholds if both given, else calibrated as stempy
# background_threshold = 28.0
# xray_threshold = 1000.0
sigma = 4.0
xray_sigma = 175.0
samples = 1200
calibration_frames = 640
workers = 1                 # counting threads per node group
method = "maxima"           # stempy's strict 3x3 maxima, or "clusters" (docs/counting.md)

[flow]
send_hwm = 4                # messages (blocks of sectors, ~5 MB each) queued per socket
backpressure_timeout_s = 5  # a producer blocked this long spills to disk
max_pending_blocks = 24     # blocks a node group holds while sectors of them are still missing
end_timeout_s = 3           # wait after the first end marker for the rest
scan_timeout_s = 60         # a scan with no traffic for this long is closed as it stands
heartbeat_s = 0.5
dead_after_s = 5            # a node group silent this long mid-scan is failed over
retain_blocks = 64          # sent blocks a producer keeps until committed (resend after failover)

[security]                  # CURVE encryption + authentication on every link (see transport.curve)
curve = false
keys_dir = "keys"           # made by `stemstream keys keys`
server_key = "server"       # keys_dir/server.key(_secret): the listening sockets' key pair
client_key = "client"       # keys_dir/client.key(_secret): this host's connecting sockets
authorized_dir = ""         # public keys allowed to connect; default keys_dir/authorized
token_file = ""             # curve off: control's session token (see transport.session_token);
                            # default beside [pipeline] state_file ("x.state" -> "x.token")
```
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from stemstream.core.detector import N_MODULES


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one sentence."""


@dataclass
class NetworkConfig:
    host: str = "127.0.0.1"
    control_port: int = 5550
    writer_port: int = 5551
    gateway_port: int = 5552  # gateway_port + m is module m's input (4 ports)
    live_port: int = 5556  # the writer's live results (images, progress) for the dashboard
    node_base_port: int = 5560
    dashboard_port: int = 8000  # the web dashboard (HTTP), on the host that runs `stemstream serve`
    control_host: str = ""
    gateway_host: str = ""
    # Several gateways (e.g. one per receiver): gateway g runs on gateway_hosts[g] and forwards
    # the modules m with m % len(gateway_hosts) == g. Empty: one gateway, on gateway_host.
    gateway_hosts: list[str] = field(default_factory=list)
    writer_host: str = ""
    node_hosts: list[str] = field(default_factory=list)
    bind_host: str = "*"  # what listening sockets bind to
    # "tcp", or "ipc" (Unix domain sockets under ipc_dir, named by port): every role on one host,
    # about half the CPU per byte of TCP on loopback.
    transport: str = "tcp"
    ipc_dir: str = ""
    # Every role on one host: blocks of sectors go through shared memory files in shm_dir and
    # only descriptors through the sockets (see transport.shared_memory).
    shared_memory: bool = False
    shm_dir: str = "/dev/shm"

    def _endpoint(self, host: str, port: int) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.ipc_dir}/{port}"
        return f"tcp://{host}:{port}"

    def _host(self, specific: str) -> str:
        return specific or self.host

    def control(self) -> str:
        return self._endpoint(self._host(self.control_host), self.control_port)

    @property
    def gateways(self) -> int:
        """How many gateways the config names (1 unless gateway_hosts lists several)."""
        return max(1, len(self.gateway_hosts))

    def gateway_of(self, module: int) -> int:
        """The gateway that forwards ``module``'s blocks."""
        return module % self.gateways

    def gateway_modules(self, index: int) -> list[int]:
        """The modules gateway ``index`` forwards."""
        return [m for m in range(N_MODULES) if self.gateway_of(m) == index]

    def gateway(self, module: int) -> str:
        """``module``'s input on the gateway that forwards it (each module has its own port)."""
        host = self.gateway_hosts[self.gateway_of(module)] if self.gateway_hosts else self._host(self.gateway_host)
        return self._endpoint(host, self.gateway_port + module)

    def writer(self) -> str:
        return self._endpoint(self._host(self.writer_host), self.writer_port)

    def live(self) -> str:
        """The writer's live-results service (request/reply, see pipeline.writer.live)."""
        return self._endpoint(self._host(self.writer_host), self.live_port)

    def node(self, index: int, module: int) -> str:
        host = self.node_hosts[index] if index < len(self.node_hosts) else self.host
        return self._endpoint(host, self.node_port(index, module))

    def node_at(self, host: str, index: int, module: int) -> str:
        """Node group ``index``'s input for ``module`` on ``host`` (as it registered with control;
        empty: the configured host)."""
        return self.node(index, module) if not host else self._endpoint(host, self.node_port(index, module))

    def node_port(self, index: int, module: int) -> int:
        # One stream per module keeps the modules' flow control apart (see pipeline.node.role).
        return self.node_base_port + N_MODULES * index + module

    def bind(self, port: int) -> str:
        return self._endpoint(self.bind_host, port)


@dataclass
class PipelineSettings:
    nodes: int = 2
    gateway: bool = True
    block_frames: int = 32
    output_dir: str = "."
    spill_dir: str = "spill"
    # Control's scans, rewritten on every change, read back when control restarts
    # (pipeline.control.state); "" keeps them in memory only.
    state_file: str = "stemstream-control.state"


#: Counting methods: stempy's strict 3 x 3 maxima (counting.kernel, the default) and connected
#: clusters with electrons per cluster from their charge (counting.clusters).
COUNTING_METHODS = ("maxima", "clusters")


@dataclass
class CountingSettings:
    background_threshold: float | None = None
    xray_threshold: float | None = None
    sigma: float = 4.0
    xray_sigma: float = 175.0
    samples: int = 1200
    calibration_frames: int = 640
    workers: int = 1
    method: str = "maxima"

    @property
    def fixed(self) -> bool:
        return self.background_threshold is not None and self.xray_threshold is not None


@dataclass
class FlowSettings:
    send_hwm: int = 4
    backpressure_timeout_s: float = 5.0
    max_pending_blocks: int = 24
    end_timeout_s: float = 3.0
    scan_timeout_s: float = 60.0
    heartbeat_s: float = 0.5
    # A node group silent this long during a scan is failed over (its work goes to the others).
    dead_after_s: float = 5.0
    # Blocks a producer keeps after sending, until the writer commits them, to resend after a
    # failover (~5 MB each at 32 frames per block); when full, the producer waits, then spills.
    retain_blocks: int = 64

    @property
    def silent_after_s(self) -> float:
        """A role not heard from for this long is called silent (several heartbeats, at least 5 s:
        a loaded machine delays heartbeats, and calling a slow role dead costs frames)."""
        return max(10 * self.heartbeat_s, 5.0)


@dataclass
class SecuritySettings:
    curve: bool = False
    keys_dir: str = "keys"
    server_key: str = "server"
    client_key: str = "client"
    authorized_dir: str = ""
    # Without CURVE, requests that change something carry control's session token, read from
    # this file (transport.session_token); "": beside [pipeline] state_file.
    token_file: str = ""


@dataclass
class PipelineConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    counting: CountingSettings = field(default_factory=CountingSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    # [analysis]: which live analyses run and their parameters (see stemstream.analysis)
    analysis: dict = field(default_factory=dict)

    def validate(self) -> PipelineConfig:
        """Check values that types cannot; raises ConfigError. Returns self."""
        p, c, f, n = self.pipeline, self.counting, self.flow, self.network
        checks = [
            (1 <= p.nodes <= 1024, f"[pipeline] nodes must be 1 to 1024, got {p.nodes}"),
            (1 <= p.block_frames <= 1024, f"[pipeline] block_frames must be 1 to 1024, got {p.block_frames}"),
            ((c.background_threshold is None) == (c.xray_threshold is None),
             "[counting] give both background_threshold and xray_threshold, or neither (to calibrate)"),
            (not c.fixed or c.xray_threshold > c.background_threshold,
             "[counting] xray_threshold must be above background_threshold"),
            (c.samples >= 1, f"[counting] samples must be at least 1, got {c.samples}"),
            (c.calibration_frames >= 1, f"[counting] calibration_frames must be at least 1, got {c.calibration_frames}"),
            (c.workers >= 1, f"[counting] workers must be at least 1, got {c.workers}"),
            (c.method in COUNTING_METHODS,
             f"[counting] method must be one of {', '.join(COUNTING_METHODS)}, got {c.method!r}"),
            (f.send_hwm >= 1, f"[flow] send_hwm must be at least 1, got {f.send_hwm}"),
            (f.max_pending_blocks >= 2, f"[flow] max_pending_blocks must be at least 2, got {f.max_pending_blocks}"),
        ]
        checks.append((f.retain_blocks >= 1, f"[flow] retain_blocks must be at least 1, got {f.retain_blocks}"))
        for name in ("backpressure_timeout_s", "end_timeout_s", "scan_timeout_s", "heartbeat_s", "dead_after_s"):
            value = getattr(f, name)
            checks.append((0 < value <= 86400, f"[flow] {name} must be a positive number of seconds, got {value}"))
        for name in ("control_port", "gateway_port", "writer_port", "live_port", "node_base_port", "dashboard_port"):
            value = getattr(n, name)
            checks.append((1 <= value <= 65535, f"[network] {name} must be a port number 1 to 65535, got {value}"))
        checks.append((n.node_base_port + 4 * p.nodes - 1 <= 65535, "[network] node_base_port + 4 x nodes exceeds 65535"))
        checks.append((n.gateway_port + 3 <= 65535, "[network] gateway_port + 3 exceeds 65535"))
        checks.append((len(n.gateway_hosts) <= 4 and all(n.gateway_hosts),
                       f"[network] gateway_hosts names at most 4 gateways (one per module), no empty name; got {n.gateway_hosts}"))
        checks.append((n.transport in ("tcp", "ipc"), f"[network] transport must be \"tcp\" or \"ipc\", got {n.transport!r}"))
        checks.append((n.transport != "ipc" or bool(n.ipc_dir), "[network] transport \"ipc\" needs ipc_dir, a directory for the sockets"))
        s = self.security
        for name in ("server_key", "client_key"):
            value = getattr(s, name)
            checks.append((bool(value) and "/" not in value, f"[security] {name} must be a key name (a file name in keys_dir), got {value!r}"))
        checks.append((not s.curve or bool(s.keys_dir), "[security] curve = true needs keys_dir, the directory made by `stemstream keys`"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        # [analysis] names analyses (user modules among them): stemstream.deploy.settings checks
        # it, so that validating a config here never imports user code.
        return self

    def to_dict(self) -> dict:
        def clean(obj: Any) -> Any:
            return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}

        sections = {name: clean(getattr(self, name)) for name in ("network", "pipeline", "counting", "flow", "security")}
        if self.analysis:
            sections["analysis"] = self.analysis
        return sections

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(tomli_w.dumps(self.to_dict()))
        return path


def _coerce(section: str, name: str, value: Any, annotation: str) -> Any:
    where = f"[{section}] {name}"
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if annotation == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {annotation}")  # pragma: no cover


def config_from_dict(data: dict) -> PipelineConfig:
    """Build and validate a config from nested dicts (as TOML gives them)."""
    config = PipelineConfig()
    for section, values in data.items():
        if section not in ("network", "pipeline", "counting", "flow", "analysis", "security"):
            raise ConfigError(f"unknown section [{section}] (known: network, pipeline, counting, flow, analysis, security)")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of settings")
        if section == "analysis":
            config.analysis = values  # checked by stemstream.deploy.settings (it imports the analyses)
            continue
        target = getattr(config, section)
        known = {f.name: f.type for f in dataclasses.fields(target)}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown setting '{name}' in [{section}] (known: {', '.join(sorted(known))})")
            setattr(target, name, _coerce(section, name, value, str(known[name])))
    return config.validate()


def load_config(path: str | Path | None) -> PipelineConfig:
    """Read a TOML config file (None: the defaults). Raises ConfigError with one sentence."""
    if path is None:
        return PipelineConfig().validate()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(data)
