"""Starting a real ``tritonserver`` on a model repository, on loopback ports, and stopping it cleanly.

Where the server comes from: ``--tritonserver PATH``, else the binary shipped in the ``nvidia-pytriton`` wheel of
this Python (``vpsde[serve]``), else ``tritonserver`` on PATH (NVIDIA's containers). For the pytriton binary the
Python backend is assembled in a private directory (its ``libtriton_python.so`` and the stub built for this
Python's version), and the stub runs this Python environment: it finds it through ``PATH`` (the embedded
interpreter takes its prefix from the first ``python3`` there) and ``libpythonX.Y.so`` through
``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vpsde.runtime.errors import BackendUnavailable, VpsdeError


@dataclass
class TritonInstall:
    """A tritonserver binary, its backend directory, and the environment its Python backend stub needs."""

    binary: Path
    backend_dir: Path | None
    env: dict[str, str] = field(default_factory=dict)


def find_tritonserver(explicit: str | None = None, python_env: str | None = None) -> TritonInstall:
    """Locate tritonserver (see the module docstring); ``python_env`` (a venv or prefix with vpsde installed) is
    the Python the model runs in (default: this one)."""
    prefix = Path(python_env or sys.prefix)
    env = {"PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    if explicit:
        if not Path(explicit).is_file():
            raise BackendUnavailable(f"--tritonserver {explicit}: no such file")
        return TritonInstall(Path(explicit), None, env)
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise BackendUnavailable(f"{home}: nvidia-pytriton has no Python backend stub for Python {version}")
        import numpy

        if python_env is None and int(numpy.__version__.split(".")[0]) >= 2:
            raise BackendUnavailable(f"nvidia-pytriton's Python backend stub is built against numpy 1.x, and this "
                                     f"Python has numpy {numpy.__version__}: run vpsde serve from an environment with "
                                     "vpsde[serve] installed (it pins numpy<2; `make install` creates .venv-serve)")
        libs = home.parent.parent / "nvidia_pytriton.libs"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)
        return TritonInstall(home / "bin" / "tritonserver", home / "backends", env)
    found = shutil.which("tritonserver")
    if found:
        return TritonInstall(Path(found), None, env)
    raise BackendUnavailable("no tritonserver here: run vpsde serve from the serving environment (`make install` "
                             "creates .venv-serve: .venv-serve/bin/vpsde serve ...; elsewhere a virtual environment of "
                             "its own with pip install 'vpsde[serve]', which pins numpy<2), inside NVIDIA's Triton "
                             "container, or pass --tritonserver PATH")


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec (Linux): get SIGTERM when the parent dies, even by SIGKILL, so no server outlives
    the `vpsde serve` that started it; exit now if the parent is already gone."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the server is stopped by stop() only
    if os.getppid() != parent:
        os._exit(1)


def owned_temp_dir(name: str) -> tuple[Path, int]:
    """A new directory in the temporary directory, locked while this process lives, after sweeping the ones of
    the same ``name`` whose owner died (even by SIGKILL): (path, lock descriptor; close it after removing)."""
    from vpsde.runtime.atomic import locked_temp, sweep_stale

    parent = Path(tempfile.gettempdir())
    sweep_stale(parent, name)
    return locked_temp(parent, name, "", make_dir=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_listenable(host: str, port: int, flag: str) -> None:
    """One line naming ``flag`` if ``host:port`` cannot be listened on (taken, or not an address here), before
    tritonserver is started: it says so in a gRPC status dump, after loading its models."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
            s.listen()
        except OSError as e:
            raise BackendUnavailable(f"{flag} {port}: cannot listen on {host}:{port} ({_why(e)})") from None


def _why(e: OSError) -> str:
    """The system's words for ``e`` (asyncio's bind error puts a long message where strerror goes)."""
    return os.strerror(e.errno) if e.errno else e.strerror or str(e)


DEFAULT_MAX_REQUEST_MIB = 64


class TritonServer:
    """A running tritonserver (a context manager): gRPC on ``host``, HTTP on ``host`` through the request gate
    (``serving/gate.py``: at most ``max_request_bytes`` per body; tritonserver's own HTTP port is private, on
    loopback), Triton's metrics (Prometheus text, the model's ``vpsde_*`` gauges among them) on ``host:metrics_port``
    when one is given, else off. ``stop()`` sends SIGTERM (Triton drains in-flight requests and unloads models), then
    SIGKILL after ``grace`` seconds, and removes the server's private directory (its backends, log and TMPDIR)."""

    def __init__(self, repository: Path, install: TritonInstall, http_port: int | None = None,
                 grpc_port: int | None = None, host: str = "127.0.0.1", log: Path | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_MIB << 20, metrics_port: int | None = None) -> None:
        from vpsde.serving.gate import RequestGate

        self.repository, self.install, self.host = Path(repository), install, host
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port
        self.gate = RequestGate(host, self.http_port, free_port(), max_request_bytes)
        try:
            self.gate.start()
        except OSError as e:
            self.gate.stop()
            raise BackendUnavailable(f"--http-port {self.http_port}: cannot listen on {host}:{self.http_port} "
                                     f"({_why(e)})") from None
        try:
            for flag, port in (("--grpc-port", self.grpc_port), ("--metrics-port", metrics_port)):
                if port:
                    check_listenable(host, port, flag)
        except BackendUnavailable:
            self.gate.stop()
            raise
        self._work, self._work_lock = owned_temp_dir("vpsde-triton")
        self.log_path = log or self._work / "tritonserver.log"
        args = [str(install.binary), f"--model-repository={self.repository}", "--http-address=127.0.0.1",
                f"--grpc-address={host}", f"--http-port={self.gate.upstream_port}", f"--grpc-port={self.grpc_port}",
                "--exit-on-error=true", "--disable-auto-complete-config", "--exit-timeout-secs=30",
                *([f"--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                   f"--metrics-address={host}", f"--metrics-port={metrics_port}"] if metrics_port else
                  ["--allow-metrics=false"])]
        if install.backend_dir is not None:
            backends = self._work / "backends"
            (backends / "python").mkdir(parents=True)
            for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
                shutil.copy(install.backend_dir / "python" / f, backends / "python" / f)
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            shutil.copy(install.backend_dir.parent / "python_backend_stubs" / version / "triton_python_backend_stub",
                        backends / "python" / "triton_python_backend_stub")
            args.append(f"--backend-directory={backends}")
        self._log = open(self.log_path, "wb")
        parent = os.getpid()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **install.env, "TMPDIR": str(self._work)},
                                        start_new_session=True,
                                        preexec_fn=lambda: _die_with_parent(parent))

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def wait_ready(self, timeout: float = 180) -> None:
        """Block until /v2/health/ready answers 200; BackendUnavailable with the server log's errors if the
        server exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VpsdeError(f"tritonserver exited with {self.process.returncode}: {self.errors()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        errors = self.errors()  # before stop(), which removes the log
        self.stop()
        raise VpsdeError(f"tritonserver was not ready after {timeout:.0f} s: {errors}")

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port else None

    def notices(self) -> list[str]:
        """The lines the vpsde model printed to the server log as it loaded (e.g. why it serves per request)."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if ln.startswith("vpsde: ")]

    def errors(self) -> str:
        """The server log's error lines (model load failures carry vpsde's message), one line."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return "(no log)"
        lines = [ln.split('] "', 1)[-1].rstrip('"') for ln in text.splitlines() if ln.startswith("E") or "error" in ln]
        if lines:
            return " | ".join(lines[-3:])
        return text.strip().splitlines()[-1] if text.strip() else "(empty log)"

    def stop(self, grace: float = 30) -> int:
        self.gate.close()  # an idle keep-alive client would hold tritonserver for its whole exit timeout
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        self.gate.stop()
        shutil.rmtree(self._work, ignore_errors=True)  # backends and the log: errors() was read before stopping
        if self._work_lock is not None:
            os.close(self._work_lock)
            self._work_lock = None
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
