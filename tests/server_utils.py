"""Start real `moeserve serve` processes on free 127.0.0.1 ports for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    grpc_port: int
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM: the graceful path (drain, then exit 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(model: str, *flags: str, log_path: str | None = None, timeout: float = 90.0,
                 env: dict[str, str] | None = None) -> ServerProcess:
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "moeserve.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", str(grpc_port), "--log-level", "warning", *flags]
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, grpc_port, model)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("server did not become healthy in time")


def engine_pid(front_pid: int) -> int:
    """The engine process `moeserve serve` started (its multiprocessing child that is not the
    resource tracker)."""
    children = []
    for task in os.listdir(f"/proc/{front_pid}/task"):
        with open(f"/proc/{front_pid}/task/{task}/children") as f:
            children += [int(p) for p in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return pid
    raise RuntimeError(f"no engine process under {front_pid}")


def maps_libtorch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()
