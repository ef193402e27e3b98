"""Several hosts on one machine: network namespaces joined by veth pairs on a bridge.

Each host is a network namespace with one address on a private /24 that only this test
run uses; processes started "on" a host run inside its namespace, so they reach the
others only through the bridge, as over a network. ``cut`` takes a host off the network
(its link goes down); ``kill_all`` ends every process in it, as a power cut would.
Everything is removed at ``close``. Needs root and iproute2 (``ip netns``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def available() -> str:
    """'' when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    """One namespace, its address and the processes started on it."""

    name: str
    namespace: str
    address: str
    veth: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]


class Network:
    """A bridge and the hosts on it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag[:6]
        # A /24 no interface here uses yet: 10.231.<n>.0/24.
        used = _ip("-o", "addr").stdout
        for _ in range(50):
            third = random.randint(1, 254)
            prefix = f"10.231.{third}."
            if prefix not in used:
                break
        else:  # pragma: no cover - the machine would need 50 such networks already
            raise RuntimeError("no free 10.231.x.0/24 for the test hosts")
        self.prefix = prefix
        self.bridge = f"mpbr{self.tag}"
        self.hosts: dict[str, Host] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{prefix}1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # Docker sets the FORWARD policy to DROP and bridged frames pass iptables
        # (br_netfilter): let the hosts reach each other across this bridge.
        self._forward("-I")

    @property
    def gateway(self) -> str:
        """This machine's own address on the network (the test process talks from it)."""
        return f"{self.prefix}1"

    def add(self, name: str) -> Host:
        number = 10 + len(self.hosts)
        namespace = f"mp{self.tag}-{name}"
        outside, inside = f"mp{self.tag}{number}", f"mp{self.tag}{number}i"
        _ip("netns", "add", namespace)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        address = f"{self.prefix}{number}"
        for args in (
            ("addr", "add", f"{address}/24", "dev", inside),
            ("link", "set", inside, "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", self.gateway),
        ):
            _ip("-n", namespace, *args)
        host = Host(name, namespace, address, outside)
        self.hosts[name] = host
        return host

    def start(
        self,
        host: Host,
        argv: list[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run ``argv`` on ``host`` (inside its namespace), output to ``log``."""
        process = subprocess.Popen(
            host.command(argv),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        host.processes.append(process)
        return process

    def cut(self, host: Host) -> None:
        """Take ``host`` off the network: its processes live on, unreachable."""
        _ip("link", "set", host.veth, "down")

    def pids(self, host: Host) -> list[int]:
        out = _ip("netns", "pids", host.namespace, check=False).stdout
        return [int(pid) for pid in out.split()]

    def kill_all(self, host: Host) -> int:
        """SIGKILL every process in ``host``'s namespace; how many there were."""
        killed = 0
        for _ in range(5):
            pids = self.pids(host)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.2)
        for process in host.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        return killed

    def _forward(self, action: str) -> None:
        if shutil.which("iptables") is None:
            return
        subprocess.run(
            ["iptables", action, "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"],
            capture_output=True,
            check=False,
        )

    def close(self) -> None:
        for host in self.hosts.values():
            self.kill_all(host)
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        self._forward("-D")
