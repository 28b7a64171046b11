"""Hosts as Linux network namespaces, for cluster tests (root only).

``Lan(n)`` makes n "hosts" (namespaces ``db<tag>h<i>``, each with ``eth0`` = 10.213.<k>.<i+1>/24 and
``lo``) joined by a bridge inside a switch namespace (``db<tag>sw``), so nothing is added to the
machine's own network: no address, no route, no interface outside the namespaces. ``cut(i)`` and
``restore(i)`` take host i's switch port down and up: its packets vanish (no RST, no ICMP), as when a
cable or a switch port fails. ``close()`` deletes every namespace (and so every interface) it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Lan:
    def __init__(self, hosts: int) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.subnet = 10 + int(self.tag, 16) % 240           # 10.213.<subnet>.0/24, per Lan
        self.switch = f"db{self.tag}sw"
        self.names = [f"db{self.tag}h{i}" for i in range(hosts)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # the pair is created inside the host namespace, then one end moves to the switch
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", ns, "link", "set", f"p{i}", "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def address(self, i: int) -> str:
        return f"10.213.{self.subnet}.{i + 1}"

    def cmd(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run on host i."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def cut(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def restore(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
