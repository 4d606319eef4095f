"""Start a Triton Inference Server holding the ``segment`` and ``network`` models of one model.

``tritonserver`` is the one on ``PATH`` (NVIDIA's Triton containers) or the binary shipped in the
``nvidia-pytriton`` wheel (installed with ``--no-deps``: its metadata pins numpy < 2). The models
are Python-backend models (:mod:`.models`) in a temporary model repository; the backend's stub
for this Python version is placed beside it, and the server's environment lets the stub load this
interpreter's ``libpython`` and packages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from selfadapt_deploy.errors import ServeError
from selfadapt_deploy.export.triton_repo import model_config
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH
from selfadapt_deploy.serving.front import Front
from selfadapt_deploy.serving.models import IMAGE_INPUTS, SETTING_INPUTS

TMP_PREFIX = "sa-deploy-serve-"  # the temporary model repository of one serve process
OWNER_FILE = "owner.pid"  # in it: the pid of the serve process that made it
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies (Linux)


def _die_with_parent() -> None:
    """In the tritonserver child, before exec: SIGTERM it when the serve process dies, even by
    kill -9 (Linux's parent-death signal; Triton then stops its Python-backend stubs itself)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the children outlive a killed parent
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_repositories(tmp: Path | None = None) -> list[Path]:
    """Temporary model repositories left by serve processes that no longer run (killed with -9),
    removed; returns them. A repository whose owner still runs is never touched."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        try:
            pid = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (no owner recorded)
        if not _pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on now (for Triton's own HTTP endpoint behind the front)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


INSTALL_HINT = ("pip install --no-deps 'nvidia-pytriton==0.7.0' (Linux x86-64; it ships tritonserver), "
                "or run inside NVIDIA's Triton container, or pass --tritonserver PATH")


@dataclass(frozen=True)
class ServeSettings:
    """What the served models run: ``sa-deploy segment``'s model, runtime and device options."""

    model: str
    runtime: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 8  # the network model's largest dynamic batch (tiles)
    max_image_pixels: int = 8192 * 8192  # larger segment requests are refused
    batch_size: int = 8  # tiles per network batch inside the segment model
    instances: int = 1  # copies of each model (requests to one copy run one at a time)
    restarts: int = 0  # how often serve restarted a dead tritonserver (a metric of the segment model)


@dataclass(frozen=True)
class Ports:
    host: str = "0.0.0.0"
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path | None  # the wheel's python backend (stub placed beside it per run)
    libs: Path | None  # the wheel's bundled shared libraries


def find_tritonserver(explicit: str | None = None) -> TritonInstall:
    """``--tritonserver``, else ``tritonserver`` on PATH, else the nvidia-pytriton wheel's."""
    found = explicit or shutil.which("tritonserver")
    if found:  # its own backend directory (NVIDIA's containers: /opt/tritonserver/backends)
        if not Path(found).is_file():
            raise ServeError(f"--tritonserver {found}: no such file")
        return TritonInstall(Path(found), None, None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError(f"no tritonserver found; {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations)))
    return TritonInstall(root / "tritonserver" / "bin" / "tritonserver",
                         root / "tritonserver" / "backends" / "python", root.parent / "nvidia_pytriton.libs")


def model_configs(settings: ServeSettings, spec: ModelSpec) -> dict[str, str]:
    """``config.pbtxt`` of the two models (Triton's protobuf text format)."""
    encoded = json.dumps(json.dumps(asdict(settings)))
    instance = f"count: {settings.instances} kind: KIND_CPU"
    settings_param = f'parameters: {{ key: "settings" value: {{ string_value: {encoded} }} }}\n'
    images = "".join(f'  {{ name: "{n}" data_type: {t} dims: [ -1, -1, -1 ] optional: true }},\n'
                     for n, t in IMAGE_INPUTS.items())
    settings_in = "".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] optional: true }},\n'
                          for n, t in SETTING_INPUTS.items())
    segment = (f'name: "segment"\nbackend: "python"\nmax_batch_size: 0\n'
               f"instance_group [ {{ {instance} }} ]\n{settings_param}input [\n{images}{settings_in}"
               '  { name: "channels" data_type: TYPE_INT32 dims: [ -1 ] optional: true }\n]\n'
               'output [ { name: "labels" data_type: TYPE_UINT32 dims: [ -1, -1 ] } ]\n')
    network = model_config("network", "", MODEL_GRAPH, spec, spec.nchan, settings.max_batch,
                           backend="python", instance=instance, extra=settings_param)
    return {"segment": segment, "network": network}


MODEL_PY = '''"""Written by sa-deploy serve: this interpreter's packages, then the model."""
import site
import sys

for folder in {site_dirs!r}:
    site.addsitedir(folder)  # runs their .pth files (editable installs, virtual environments)
sys.path[:0] = [p for p in {paths!r} if p not in sys.path]
from selfadapt_deploy.serving.models import {cls} as TritonPythonModel  # noqa: E402,F401
'''


def write_repository(root: Path, settings: ServeSettings, spec: ModelSpec) -> Path:
    """The model repository under ``root``; returns its path."""
    repo = root / "models"
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    for name, text in model_configs(settings, spec).items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(text)
        cls = {"segment": "SegmentModel", "network": "NetworkModel"}[name]
        (repo / name / "1" / "model.py").write_text(
            MODEL_PY.format(site_dirs=site_dirs, paths=paths, cls=cls))
    return repo


def _backends(root: Path, install: TritonInstall) -> Path | None:
    """The wheel's python backend with the stub for this Python version beside it; None for a
    server that brings its own backends."""
    if install.python_backend is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install.python_backend.parents[1] / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"the installed tritonserver has no Python-backend stub for Python {version}")
    target = root / "backends" / "python"
    shutil.copytree(install.python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return target.parent


def _environment(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(install.libs or ""), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)  # this Python's libpython first
    return env


class TritonServer:
    """``with TritonServer(...) as server:`` a running server (ready when entered); stopped with
    SIGTERM on exit. ``log`` receives the server's output."""

    def __init__(self, settings: ServeSettings, spec: ModelSpec, ports: Ports = Ports(),
                 tritonserver: str | None = None, startup_timeout: float = 300.0):
        self.settings, self.spec, self.ports = settings, spec, ports
        self.install = find_tritonserver(tritonserver)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.stop_requested = False
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.front: Front | None = None  # clients' HTTP port; it forwards to Triton's, on loopback
        self.triton_http = 0  # Triton's own HTTP port (loopback), chosen at each start

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.ports.host in ("0.0.0.0", "") else self.ports.host
        return f"http://{host}:{self.ports.http}"

    def __enter__(self) -> TritonServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop tritonserver and the front."""
        self.stop()
        if self.front is not None:
            self.front.stop()
            self.front = None

    def command(self, repo: Path, backends: Path | None) -> list[str]:
        p = self.ports
        cmd = [str(self.install.binary), f"--model-repository={repo}", "--exit-on-error=true",
               "--strict-readiness=true", f"--http-address={LOOPBACK}", f"--http-port={self.triton_http}",
               f"--grpc-address={p.host}", f"--grpc-port={p.grpc}", "--allow-metrics=true",
               f"--metrics-address={p.host}", f"--metrics-port={p.metrics}", "--log-info=false",
               "--exit-timeout-secs=30"]
        return cmd + ([f"--backend-directory={backends}"] if backends else [])

    def start(self) -> None:
        from selfadapt_deploy.serving.client import TritonHTTPClient

        remove_stale_repositories()
        self.triton_http = free_port()
        if self.front is None:
            try:
                self.front = Front(self.ports.host, self.ports.http, (LOOPBACK, self.triton_http)).start()
            except OSError as exc:
                raise ServeError(f"cannot listen on {self.ports.host}:{self.ports.http} ({exc}); is "
                                 "another server using --http-port?") from None
        self.front.upstream = (LOOPBACK, self.triton_http)
        self._tmp = tempfile.TemporaryDirectory(prefix=TMP_PREFIX)
        root = Path(self._tmp.name)
        (root / OWNER_FILE).write_text(str(os.getpid()))
        cmd = self.command(write_repository(root, self.settings, self.spec), _backends(root, self.install))
        self.log_path = root / "tritonserver.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=_environment(self.install), preexec_fn=_die_with_parent)
        client = TritonHTTPClient(f"http://{LOOPBACK}:{self.triton_http}")
        deadline = time.monotonic() + self.startup_timeout
        while not self.stop_requested and not client.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ServeError(f"tritonserver did not become ready (exit code {self.process.returncode}); "
                                 f"its log ends:\n{tail}")
            time.sleep(0.25)
        client.close()

    def restart(self) -> None:
        """A fresh tritonserver after the last one died (not ready while it starts); the restart
        count goes into the models' settings, so the metrics show it."""
        self.settings = replace(self.settings, restarts=self.settings.restarts + 1)
        self.stop()
        self.start()

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's log, without the GPU-monitoring noise of a CPU machine."""
        text = self.log_path.read_bytes().decode(errors="replace").splitlines()
        return "\n".join([t for t in text if "NVML" not in t and "DCGM" not in t][-lines:])

    def request_stop(self) -> None:
        """Ask the server to shut down (safe from a signal handler, also while it starts)."""
        self.stop_requested = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        return self.process.wait() if self.process else 0

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


MAX_RESTARTS = 100  # a tritonserver that keeps dying is given up on after this many restarts


def serve_forever(server: TritonServer, report: Callable[[str], None]) -> int:
    """Run ``server`` until SIGTERM or SIGINT (forwarded as a clean shutdown). A tritonserver that
    dies (a request that crashes it, an OOM kill) is restarted and the restart reported; one that
    cannot start again ends serve with its log."""
    def shutdown(_signum, _frame) -> None:
        server.request_stop()

    previous = {s: signal.signal(s, shutdown) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server:
            p = server.ports
            report(f"serving segment and network on http {p.host}:{p.http}, grpc {p.host}:{p.grpc}, "
                   f"metrics {p.host}:{p.metrics} (Ctrl-C or SIGTERM stops)")
            while True:
                code = server.wait()
                tail = server.log_tail()
                if server.stop_requested or server.settings.restarts >= MAX_RESTARTS:
                    break
                report(f"tritonserver died (exit code {code}); restarting it "
                       f"(restart {server.settings.restarts + 1}); its log ends:\n{tail}")
                server.restart()
                if server.stop_requested:
                    break
                report("serving again")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if server.stop_requested:
        report("stopped")
        return 0
    report(f"tritonserver exited with code {code} after {server.settings.restarts} restarts; its log "
           f"ends:\n{tail}")
    return code or 1
