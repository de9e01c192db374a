"""Ray clusters inside network namespaces the tests create (root only): loopback for one node,
a veth pair with private 10.213.x.0/24 addresses for two. Ray never sees the machine's own
network, every process the cluster started is killed by namespace, and the namespaces are
deleted at the end. Ray's token auth is off in these clusters (RAY_AUTH_MODE=disabled): nothing
outside the namespaces can reach them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Netns:
    def __init__(self, name: str):
        self.name = name
        _ip("netns", "add", name)
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def delete(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class RayNetnsCluster:
    """A Ray head in its own namespace (and with `two_nodes`, a worker node in a second one,
    joined by a veth pair). `run(args)` runs a command in the head's namespace."""

    def __init__(self, num_cpus: int = 4, two_nodes: bool = False):
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.temp_dir = f"/tmp/msr-{tag}"  # Ray's session files, removed at the end (short: socket paths)
        self.namespaces: list[Netns] = []
        self.veth = f"msr{tag}a"
        try:
            head = Netns(f"msr-{tag}-head")
            self.namespaces.append(head)
            if two_nodes:
                node = Netns(f"msr-{tag}-node")
                self.namespaces.append(node)
                _ip("link", "add", self.veth, "type", "veth", "peer", "name", f"msr{tag}b")
                _ip("link", "set", self.veth, "netns", head.name)
                _ip("link", "set", f"msr{tag}b", "netns", node.name)
                for ns, dev, addr in ((head, self.veth, "10.213.0.1/24"), (node, f"msr{tag}b", "10.213.0.2/24")):
                    subprocess.run(ns.cmd("ip", "addr", "add", addr, "dev", dev), check=True)
                    subprocess.run(ns.cmd("ip", "link", "set", dev, "up"), check=True)
                self.ips = ["10.213.0.1", "10.213.0.2"]
            else:
                self.ips = ["127.0.0.1"]
            self.address = f"{self.ips[0]}:6379"
            self.env = {**os.environ, **RAY_ENV}
            ray = str(VENV_BIN / "ray")
            subprocess.run(head.cmd(ray, "start", "--head", "--node-ip-address", self.ips[0], "--port", "6379",
                                    "--num-cpus", str(1 if two_nodes else num_cpus), "--include-dashboard=false",
                                    "--disable-usage-stats", "--temp-dir", self.temp_dir),
                           check=True, capture_output=True, env=self.env, timeout=120)
            if two_nodes:
                subprocess.run(node.cmd(ray, "start", "--address", self.address, "--node-ip-address", self.ips[1],
                                        "--num-cpus", "1", "--disable-usage-stats"),
                               check=True, capture_output=True, env=self.env, timeout=120)
        except BaseException:
            self.stop()
            raise

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.namespaces[0].cmd(*args), capture_output=True, text=True, env=self.env,
                              timeout=timeout)

    def stop(self) -> None:
        for ns in reversed(self.namespaces):
            ns.delete()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_cluster_fixture(**kwargs):
    """A module-scoped fixture body: one cluster for the module, gone afterwards."""
    if not can_make_namespaces():
        pytest.skip("network namespaces need root and iproute2")
    pytest.importorskip("ray")
    cluster = RayNetnsCluster(**kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()
