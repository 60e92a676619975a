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
import errno
import hashlib
import json
import os
import re
import secrets
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
from dsa_export.serving.stages import NODES_ENV

TRITON_SERVER_WHEEL = "nvidia-pytriton==0.7.0"  # tritonserver 2.51.0 (NGC 24.10), installed without its deps
# what the repository's Python models import, in the server's Python: numpy < 2 (see the module docstring)
SERVING_REQUIREMENTS = ("numpy==1.26.4", "onnxruntime==1.32.0", "tokenizers==0.23.3", "jinja2==3.1.6",
                        "tritonclient[grpc]==2.73.0")  # the last: the first node steps the stages of the others
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


def _cannot_listen(host: str, port: int) -> str | None:
    """Why nothing can listen on host:port now (None: it can)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"unknown host: {e.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            return "in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
    return None


SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+=-]+$")  # what the Python backend's stub command line survives (see serve_path)
SHM_DIR = Path("/dev/shm")
NOISE = "CudaDriverHelper has not been initialized"  # logged as an error by every start on a machine without a GPU


def serve_path(repository: Path, workdir: Path) -> Path:
    """The path to give tritonserver for `repository`: itself, or an ASCII-safe symlink to it in `workdir`. The
    Python backend of 2.51 starts each model's stub through `bash -c` with the model's path unquoted, so a space
    (or a shell character) splits it and the stub dies; the symlink is not resolved by the server, and the model's
    relative paths to the build resolve through it."""
    if SAFE_PATH.match(str(repository)):
        return repository
    link = workdir / "model_repository"
    link.symlink_to(repository, target_is_directory=True)
    return link


DRAIN_FILE_ENV = "DSA_EXPORT_DRAIN_FILE"  # the generation model stops taking requests once this file exists


class TritonServer:
    """One tritonserver on 127.0.0.1 serving `repository` (gRPC, HTTP and metrics ports); its log goes to
    `log_path`. A context manager: started and ready on entry, stopped on exit. The server runs in a process group
    of its own, with a shared-memory prefix of its own: when it ends, however it ends, whatever it started (the
    Python backend's stub processes) is killed and its /dev/shm regions removed; while it runs they are kept
    readable by this user only (the Python backend creates them 0644, and requests pass through them).

    Stopping drains first, on our side: the model is told (a file named by DSA_EXPORT_DRAIN_FILE in its
    environment) to refuse new requests, and the running ones finish (its metrics say when); only then does the
    server get SIGINT. Triton's own shutdown cannot be relied on for that: it counts a decoupled request as done once
    execute() returns, and one malformed request (a wrong input dtype over a gRPC stream) keeps the model from ever
    unloading in 2.51, so the server only exits at its exit timeout."""

    def __init__(self, repository: str | Path, models: list[str], install: ServerInstall, grpc_port: int = 0,
                 http_port: int = 0, log_path: str | Path | None = None, verbose: bool = False,
                 metrics_port: int = 0, exit_timeout: float = 10.0, grpc_host: str = "127.0.0.1",
                 node_addresses: dict[int, str] | None = None):
        """grpc_host: where its gRPC listens (a node that serves stages to another: an address that node reaches);
        node_addresses: node → host:port of the servers holding the build's later stages (the first node's)."""
        self.repository = Path(repository).resolve()
        self.grpc_host = grpc_host
        self.node_addresses = dict(node_addresses or {})
        self.models = models
        self.install = install
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="dsa-serve-"))
        self.log_path = Path(log_path) if log_path else self.workdir / "server.log"
        self.verbose = verbose
        self.exit_timeout = exit_timeout
        self.shm_prefix = f"dsa_export_{os.getpid()}_{secrets.token_hex(4)}_"
        self.drain_file = self.workdir / "drain"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        host = "127.0.0.1" if self.grpc_host in ("0.0.0.0", "::") else self.grpc_host
        return f"{f'[{host}]' if ':' in host else host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        command = [str(self.install.tritonserver), f"--model-repository={serve_path(self.repository, self.workdir)}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   f"--grpc-address={self.grpc_host}", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=true", "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                   f"--exit-timeout-secs={int(self.exit_timeout)}", "--model-control-mode=explicit",
                   f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                   *[f"--load-model={m}" for m in self.models], f"--log-info={str(self.verbose).lower()}"]
        if self.install.backend_dir is not None:  # the pip server: no GPU metrics to probe
            command += [f"--backend-directory={self.install.backend_dir}", "--allow-gpu-metrics=false"]
        return command

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, **{DRAIN_FILE_ENV: str(self.drain_file),
                                  NODES_ENV: json.dumps({str(n): a for n, a in self.node_addresses.items()})})
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
        errors = [line for line in text if line[:1] == "E" and line[1:2].isdigit() and NOISE not in line]
        return " | ".join(line[:300] for line in (errors or text)[-lines:])

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def protect_shm(self) -> None:
        """The server's shared-memory regions readable by this user only."""
        for region in self.shm_regions():
            with contextlib.suppress(OSError):
                os.chmod(region, 0o600)

    def start(self, timeout: float = 180.0, progress: Callable[[float], None] | None = None) -> "TritonServer":
        """Start the server and wait up to `timeout` s for it to be ready, calling `progress(seconds waited)` about
        every 10 s meanwhile."""
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            if _port_in_use(port):
                raise DSAExportError(f"port {port} on 127.0.0.1 is already in use (another server?); choose "
                                     f"another with --grpc-port/--http-port/--metrics-port")
        for path in (self.install.tritonserver, *([self.install.backend_dir] if self.install.backend_dir else [])):
            if not SAFE_PATH.match(str(path)):
                raise DSAExportError(f"{path}: the server's own files need a path of ASCII letters, digits and "
                                     f"._/+=- only (its Python backend cannot start from another); set "
                                     f"DSA_EXPORT_SERVING_ENV to such a directory")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), preexec_fn=_stop_with_parent,
                                            start_new_session=True)
        started = time.monotonic()
        deadline, report = started + timeout, started + 10
        while not self.ready():
            if progress is not None and time.monotonic() > report:
                progress(time.monotonic() - started)
                report += 10
            if self.process.poll() is not None:
                self.cleanup()
                raise DSAExportError(f"tritonserver exited ({self.process.returncode}) before it was ready: "
                                     f"{self.log_tail()} (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise DSAExportError(f"tritonserver was not ready after {timeout:.0f} s: {self.log_tail()} "
                                     f"(log: {self.log_path})")
            self.protect_shm()
            time.sleep(0.2)
        self.protect_shm()
        return self

    def ready(self) -> bool:
        """The models loaded and every endpoint listening (the metrics service starts last)."""
        import tritonclient.grpc as grpcclient

        if not _port_in_use(self.metrics_port):
            return False
        try:
            with contextlib.closing(grpcclient.InferenceServerClient(self.grpc_url)) as client:
                return client.is_server_ready(client_timeout=2)
        except Exception:  # not listening yet
            return False

    def metrics(self) -> dict[str, float]:
        """The server's metrics now (Prometheus text from its metrics port), name{labels} → value."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode("utf-8")
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def drain(self, seconds: float) -> bool:
        """Refuse new requests and wait up to `seconds` for the running and waiting ones to finish; whether they
        did."""
        self.drain_file.touch()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            try:
                values = self.metrics()
                if values.get("dsa_draining") == 1 and values.get("dsa_requests_running", 1) == 0 and \
                        values.get("dsa_requests_waiting", 1) == 0:
                    return True
            except OSError:  # the metrics endpoint is gone: nothing more to wait for
                return False
            time.sleep(0.2)
        return False

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Drain for up to `drain_seconds`, then SIGINT (Triton unloads its models and exits), SIGKILL if it has
        not within its exit timeout and 10 s more; then what it left is removed."""
        if self.process is not None and self.process.poll() is None:
            if drain_seconds:
                self.drain(drain_seconds)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.exit_timeout + 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.cleanup()

    def cleanup(self) -> None:
        """After the server has exited: its leftover processes killed, its shared memory removed."""
        if self.process is not None:
            deadline = time.monotonic() + 10
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
                while time.monotonic() < deadline:  # until the kernel has taken them all
                    os.killpg(self.process.pid, 0)
                    time.sleep(0.05)
            except (ProcessLookupError, PermissionError):
                pass
        for region in self.shm_regions():
            with contextlib.suppress(OSError):
                region.unlink()

    def wait(self) -> int:
        """Until the server exits (its shared memory kept private meanwhile); its exit code."""
        assert self.process is not None
        while True:
            try:
                return self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.protect_shm()

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


def bytes_to_load(repository: Path, models: list[str]) -> int:
    """What the server reads before `models` are ready: each of their stages' plan (TensorRT) or graph and its
    weights (dsa_generate's own stages; a dsa_stage_<i>'s one)."""
    from dsa_export.deploy.repository import read_config

    total = 0
    for model in models:
        parameters = {k: v.string_value for k, v in read_config(repository / model / "config.pbtxt").parameters.items()}
        stages = [json.loads(parameters["stage"])] if "stage" in parameters else \
            [stage for stage in json.loads(parameters.get("stages", "[]")) if not stage.get("node")]
        for stage in stages:
            graph = (repository / model / stage.get("plan_file", stage["model_file"])).resolve()
            files = [graph] if "plan_file" in stage else [graph, *graph.parent.glob(f"{graph.name}.data*")]
            total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def ready_timeout(bytes_loaded: int) -> float:
    """Seconds to wait for readiness: 3 minutes, plus 1 s per 200 MB loaded (a v3.2 stage reads tens of GB of plan
    from disk and deserializes it onto its GPU before the model is ready)."""
    return 180.0 + bytes_loaded / 200e6


def check_nodes(source: str | Path, nodes: list[list[str]], node: int, node_addresses: dict[int, str]) -> None:
    """`serve --node/--node-address` against the nodes a build's repository spans (DSAExportError if they do not
    match): the first node needs every other node's address, the others none."""
    if node >= len(nodes):
        raise DSAExportError(f"{source}: the build runs on {len(nodes)} node(s): --node takes 0 to {len(nodes) - 1}")
    if node > 0:
        if node_addresses:
            raise DSAExportError("--node-address is for the first node (--node 0), which sends the steps to the others")
        return
    unknown = sorted(set(node_addresses) - set(range(1, len(nodes))))
    if unknown:
        raise DSAExportError(f"{source}: the build has no node {unknown[0]} (its later nodes: 1 to {len(nodes) - 1})"
                             if len(nodes) > 1 else f"{source}: the build runs on one node: no --node-address")
    missing = [n for n in range(1, len(nodes)) if n not in node_addresses]
    if missing:
        raise DSAExportError(f"{source}: stages of this build run on node(s) {', '.join(map(str, missing))}: start "
                             f"each with `dsa-export serve {source} --node N --grpc-host ADDRESS`, then give this one "
                             f"--node-address N=ADDRESS:PORT for each (one machine with GPUs for every stage: deploy "
                             f"again with --gpus-per-node that many)")


def wait_for_nodes(source: str | Path, repository: Path, nodes: list[list[str]], node_addresses: dict[int, str],
                   log: Callable[[str], None] = print) -> None:
    """Until every later node's server has its stage models ready (each allowed ready_timeout for what it loads):
    the first node starts stepping them only then."""
    import tritonclient.grpc as grpcclient

    for node, models in enumerate(nodes[1:], start=1):
        address = node_addresses[node]
        timeout = ready_timeout(bytes_to_load(repository, models))
        started = time.monotonic()
        report = started + 10
        with contextlib.closing(grpcclient.InferenceServerClient(address)) as client:
            while True:
                try:
                    if all(client.is_model_ready(model, client_timeout=2) for model in models):
                        break
                except Exception:  # not listening yet
                    pass
                if time.monotonic() - started > timeout:
                    raise DSAExportError(f"node {node} at {address} does not serve {', '.join(models)} after "
                                         f"{timeout:.0f} s: start it with `dsa-export serve {source} --node {node} "
                                         f"--grpc-host ADDRESS`, or check --node-address {node}=ADDRESS:PORT")
                if time.monotonic() > report:
                    log(f"waiting for node {node} at {address} ({', '.join(models)}) ... "
                        f"{time.monotonic() - started:.0f} s")
                    report += 10
                time.sleep(0.5)
        log(f"node {node} at {address} serves {', '.join(models)}")


def serve_repository(source: str | Path, grpc_port: int = 8001, http_port: int = 8003, metrics_port: int = 8002,
                     tritonserver: str | Path | None = None, log_file: str | Path | None = None,
                     verbose: bool = False, log: Callable[[str], None] = print, host: str = "127.0.0.1",
                     port: int = 8000, served_model_name: str | None = None, node: int = 0,
                     node_addresses: dict[int, str] | None = None, grpc_host: str = "127.0.0.1") -> None:
    """`dsa-export serve`: start the server on the repository's generation model and the OpenAI-compatible API in
    front of it (host:port), say where they listen, and run until Ctrl-C or SIGTERM; then take no new requests, let
    running ones finish (up to the model's drain time), stop, and re-raise (the command exits 130 or 143). A build
    on several nodes: node 0 does that, stepping the stages of the others at `node_addresses`; node n > 0 serves its
    stages' models on gRPC at grpc_host:grpc_port (no API: its clients are the first node's scheduler)."""
    import logging

    from dsa_export.deploy.openai_api import APIThread, OpenAIServer
    from dsa_export.deploy.repository import DRAIN_SECONDS, GENERATE, node_models, serving_parameters

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the server, even if started from `&`
    repository = repository_of(source)
    parameters = serving_parameters(repository)
    nodes = node_models(json.loads(parameters.get("stages", "[]")))
    node_addresses = dict(node_addresses or {})
    check_nodes(source, nodes, node, node_addresses)
    first = node == 0
    problem = _cannot_listen(host, port) if first else None
    if problem:
        raise DSAExportError(f"the OpenAI API cannot listen on {host}:{port} ({problem}): choose --host/--port")
    install = find_server(tritonserver, log)
    if parameters.get("runtime") == "tensorrt" and install.backend_dir is not None:
        raise DSAExportError(f"{repository}: the build has TensorRT engines, which run on a GPU with the tensorrt and "
                             f"torch packages in the server's Python: serve it in NVIDIA's Triton container (README), "
                             f"or pass --tritonserver")
    models = nodes[node]
    server = TritonServer(repository, models, install, grpc_port, http_port, log_file, verbose, metrics_port,
                          grpc_host=grpc_host, node_addresses=node_addresses)
    loaded = bytes_to_load(repository, models)
    timeout = ready_timeout(loaded)
    log(f"starting {install.tritonserver} on {repository}{f' (node {node} of {len(nodes)})' if len(nodes) > 1 else ''} "
        f"(log: {server.log_path}); it loads {loaded / 1e9:.1f} GB, allowed {timeout:.0f} s")
    started = time.monotonic()
    api = None
    try:
        if first and len(nodes) > 1:
            wait_for_nodes(source, repository, nodes, node_addresses, log)
        server.start(timeout, progress=lambda waited: log(f"loading ... {waited:.0f} s"))
        if not first:
            log(f"node {node} ready after {time.monotonic() - started:.1f} s: {', '.join(models)} on Triton gRPC "
                f"{grpc_host}:{grpc_port}; on the first node: dsa-export serve {source} --node-address "
                f"{node}=ADDRESS:{grpc_port} (ADDRESS: this machine's, as the first node reaches it). Stop with Ctrl-C "
                f"(the first node's running requests then fail; it serves again once this node is back).")
        else:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the API's access log
            model_name = served_model_name or str(source)
            api = APIThread(OpenAIServer.of_repository(repository, server.grpc_url, model_name, server.metrics_url),
                            host, port, drain_seconds=DRAIN_SECONDS).start()
            log(f"ready after {time.monotonic() - started:.1f} s: OpenAI API {api.url} (model \"{model_name}\"; "
                f"metrics {api.url.removesuffix('/v1')}/metrics); Triton gRPC {server.grpc_url}, HTTP "
                f"127.0.0.1:{server.http_port}, metrics {server.metrics_url}; {GENERATE} batches up to "
                f"{parameters.get('max_batch')} sequences per step over a pool of {parameters.get('pool_tokens')} "
                f"tokens{f', {len(nodes) - 1} more node(s) run its later stages' if len(nodes) > 1 else ''}. "
                f"Stop with Ctrl-C.")
            log(f"try: dsa-export generate --url {server.grpc_url} --prompt-ids 1,2,3")
        code = server.wait()
        how = f"was killed ({signal.Signals(-code).name})" if code < 0 else f"exited ({code})"
        raise DSAExportError(f"tritonserver {how}: {server.log_tail()} (log: {server.log_path})")
    except (KeyboardInterrupt, Interrupted):
        drain = DRAIN_SECONDS if first else 0
        log(f"stopping: running requests finish first (up to {drain} s; Ctrl-C again stops at once) ..." if first
            else "stopping ...")
        if api is not None:
            api.stop(wait=False)  # no new connections; the running streams go on while the server drains
        server.stop(drain_seconds=drain)
        log("stopped")
        raise  # the command exits 130 (SIGINT) or 143 (SIGTERM)
    finally:
        if api is not None:
            api.stop()
        server.cleanup()
