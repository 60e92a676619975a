"""Triton Inference Server on this machine: the serving environment, and one server process on loopback.

The server comes from PyPI's `nvidia-pytriton` (its bundled tritonserver 2.51 with the Python backend; no ONNX
Runtime or TensorRT backend), run in place from its site-packages (its RPATHs then resolve without LD_LIBRARY_PATH),
or is a `tritonserver` given or on PATH (NVIDIA's container). The pytriton server's Python backend corrupts tensors
when its Python has numpy >= 2, so the tool creates a serving environment of its own on first use and reuses it:
a venv under the user's cache directory with the server, numpy < 2 and what the repository's Python models import
(onnxruntime, tokenizers, jinja2), every version pinned. The Python backend's stub takes its environment from the
first `python` on PATH, so the server runs with that venv's bin first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsa_export.errors import DSAExportError, Interrupted

TRITON_SERVER_WHEEL = "nvidia-pytriton==0.7.0"  # tritonserver 2.51.0 (NGC 24.10), installed without its deps
# what the repository's Python models import, in the server's Python: numpy < 2 (see the module docstring)
SERVING_REQUIREMENTS = ("numpy==1.26.4", "onnxruntime==1.32.0", "tokenizers==0.23.3", "jinja2==3.1.6")
READY_MARKER = ".dsa-export-ready"


@dataclass(frozen=True)
class ServerInstall:
    """A tritonserver binary, the backends it loads, and the Python its Python backend runs."""
    tritonserver: Path
    backend_dir: Path | None  # None: the server's default (NVIDIA's container)
    python_bin: Path | None  # put first on PATH: the Python backend's environment (None: leave PATH alone)
    library_dirs: tuple[Path, ...] = ()


def serving_env_dir() -> Path:
    """Where the serving environment lives: $DSA_EXPORT_SERVING_ENV, or a directory under the user's cache named
    after the Python version and the pinned requirements (a change of pins makes a new one)."""
    if os.environ.get("DSA_EXPORT_SERVING_ENV"):
        return Path(os.environ["DSA_EXPORT_SERVING_ENV"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(" ".join((TRITON_SERVER_WHEEL,) + SERVING_REQUIREMENTS).encode()).hexdigest()[:10]
    return cache / "dsa-export" / f"serving-py{sys.version_info.major}.{sys.version_info.minor}-{key}"


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _pip(env: Path, args: list[str]) -> None:
    command = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise DSAExportError(f"cannot create the serving environment in {env}: pip install {' '.join(args)} failed "
                             f"({tail})")


def ensure_serving_env(log: Callable[[str], None] = print) -> Path:
    """The serving environment, created on first use (about a minute, once) and reused; an environment whose
    creation was interrupted is recreated. Creation is serialised by a lock file, so two processes never race."""
    import fcntl

    env = serving_env_dir()
    if (env / READY_MARKER).is_file():
        return env
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (env / READY_MARKER).is_file():  # made by another process while this one waited
            return env
        shutil.rmtree(env, ignore_errors=True)  # an interrupted creation
        log(f"creating the serving environment in {env} (once): {TRITON_SERVER_WHEEL}, "
            f"{', '.join(SERVING_REQUIREMENTS)}")
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
        _pip(env, ["--no-deps", TRITON_SERVER_WHEEL])  # the binaries need none of pytriton's Python deps
        _pip(env, list(SERVING_REQUIREMENTS))
        server = _site_packages(env) / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        # the Python backend looks for its stub beside itself; the wheel keeps one per Python version elsewhere
        shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub",
                     server / "backends" / "python" / "triton_python_backend_stub")
        (env / READY_MARKER).write_text(" ".join((TRITON_SERVER_WHEEL,) + SERVING_REQUIREMENTS) + "\n")
    return env


def find_server(tritonserver: str | Path | None = None, log: Callable[[str], None] = print) -> ServerInstall:
    """The server to run: the one given, else a `tritonserver` on PATH (NVIDIA's container, whose Python backend
    uses the container's Python), else the serving environment's (created on first use)."""
    if tritonserver is None:
        tritonserver = shutil.which("tritonserver")
    if tritonserver is not None:
        path = Path(tritonserver)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DSAExportError(f"{path}: not an executable tritonserver")
        return ServerInstall(path, None, None)
    env = ensure_serving_env(log)
    server = _site_packages(env) / "pytriton" / "tritonserver"
    # the Python backend's stub links libpython dynamically: where this Python keeps it, if it is not a system one
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent")
    ldlibrary = sysconfig.get_config_var("INSTSONAME") or ""
    return ServerInstall(server / "bin" / "tritonserver", server / "backends", env / "bin",
                         (libdir,) if ldlibrary and (libdir / ldlibrary).exists() else ())


def _stop_with_parent() -> None:
    """In the server's process, before exec: SIGTERM it if its parent dies (even by SIGKILL), so that no orphan
    server keeps the ports and the models (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class TritonServer:
    """One tritonserver on 127.0.0.1 serving `repository`, loading `models` only (explicit model control, so a CPU
    server never tries the GPU engine model); its log goes to `log_path`. A context manager: started and ready on
    entry, stopped (SIGINT, as Ctrl-C would) on exit."""

    def __init__(self, repository: str | Path, models: list[str], install: ServerInstall, grpc_port: int = 0,
                 http_port: int = 0, log_path: str | Path | None = None, verbose: bool = False):
        self.repository = Path(repository).resolve()
        self.models = models
        self.install = install
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="tritonserver-")) / "server.log"
        self.verbose = verbose
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        command = [str(self.install.tritonserver), f"--model-repository={self.repository}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", "--exit-timeout-secs=5", "--model-control-mode=explicit",
                   *[f"--load-model={m}" for m in self.models], f"--log-info={str(self.verbose).lower()}"]
        if self.install.backend_dir is not None:
            command.append(f"--backend-directory={self.install.backend_dir}")
        return command

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.install.python_bin is not None:
            env["PATH"] = f"{self.install.python_bin}{os.pathsep}{env.get('PATH', '')}"
            env.pop("PYTHONPATH", None)  # the project's packages must not shadow the serving environment's
            env.pop("VIRTUAL_ENV", None)
        if self.install.library_dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.install.library_dirs),
                                                      env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        return env

    def log_tail(self, lines: int = 2) -> str:
        """The server's last error lines (glog: 'E<date> ...'), else its last lines, shortened."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        errors = [line for line in text if line[:1] == "E" and line[1:2].isdigit()]
        return " | ".join(line[:300] for line in (errors or text)[-lines:])

    def start(self, timeout: float = 180.0) -> "TritonServer":
        for port in (self.grpc_port, self.http_port):
            if _port_in_use(port):
                raise DSAExportError(f"port {port} on 127.0.0.1 is already in use (another server?); choose "
                                     f"another with --grpc-port/--http-port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), preexec_fn=_stop_with_parent)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise DSAExportError(f"tritonserver exited ({self.process.returncode}) before it was ready: "
                                     f"{self.log_tail()} (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise DSAExportError(f"tritonserver was not ready after {timeout:.0f} s: {self.log_tail()} "
                                     f"(log: {self.log_path})")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        import tritonclient.grpc as grpcclient

        try:
            with contextlib.closing(grpcclient.InferenceServerClient(self.grpc_url)) as client:
                return client.is_server_ready(client_timeout=2)
        except Exception:  # not listening yet
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton unloads its models and exits), then SIGKILL if it has not after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def repository_of(source: str | Path) -> Path:
    """A build directory's model repository, or the repository itself; every config in it must parse."""
    from dsa_export.deploy.repository import GENERATE, read_config

    source = Path(source)
    repository = source / "model_repository" if (source / "model_repository").is_dir() else source
    if not (repository / GENERATE / "config.pbtxt").is_file():
        raise DSAExportError(f"{source}: neither a build directory with a model_repository nor a model repository "
                             f"(no {GENERATE}/config.pbtxt); run `dsa-export deploy --out BUILD_DIR` first")
    for config in sorted(repository.glob("*/config.pbtxt")):
        read_config(config)
    return repository


def serve_repository(source: str | Path, grpc_port: int = 8001, http_port: int = 8000,
                     tritonserver: str | Path | None = None, log_file: str | Path | None = None,
                     verbose: bool = False, log: Callable[[str], None] = print) -> None:
    """`dsa-export serve`: start the server on the repository's generation model and its step model, say where it
    listens, and run until Ctrl-C or SIGTERM, then stop it cleanly."""
    from dsa_export.deploy.repository import GENERATE, STEP_ENGINE, step_models_of

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the server, even if started from `&`
    repository = repository_of(source)
    step_models = step_models_of(repository)
    install = find_server(tritonserver, log)
    if step_models[0].startswith(STEP_ENGINE) and install.backend_dir is not None:
        raise DSAExportError(f"{repository}: the build has a TensorRT engine (dsa_engine), which runs on a GPU with "
                             f"the tensorrt and torch packages in the server's Python: serve it in NVIDIA's Triton "
                             f"container (README), or pass --tritonserver")
    server = TritonServer(repository, [*step_models, GENERATE], install, grpc_port, http_port, log_file, verbose)
    log(f"starting {install.tritonserver} on {repository} (log: {server.log_path})")
    started = time.monotonic()
    server.start()
    log(f"ready after {time.monotonic() - started:.1f} s: gRPC {server.grpc_url}, HTTP 127.0.0.1:{server.http_port}; "
        f"models {GENERATE} (steps by {' -> '.join(step_models)}). Stop with Ctrl-C.")
    log(f"try: dsa-export generate --url {server.grpc_url} --prompt-ids 1,2,3")
    try:
        code = server.wait()
        raise DSAExportError(f"tritonserver exited ({code}): {server.log_tail()} (log: {server.log_path})")
    except (KeyboardInterrupt, Interrupted):
        log("stopping the server ...")
        server.stop()
        log("stopped")
        raise  # the command exits 130 (SIGINT) or 143 (SIGTERM)
