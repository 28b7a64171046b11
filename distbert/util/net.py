"""This host's address as other hosts reach it."""

from __future__ import annotations

import socket


def host_address() -> str:
    """The address workers should dial when rank 0 binds a wildcard or picks its own address.

    This host's FQDN's IP; if that is a loopback address (common: ``127.0.1.1`` in /etc/hosts),
    the address of the interface the default route uses (a UDP ``connect`` sends no packet).
    """
    for name in (socket.getfqdn(), socket.gethostname()):
        try:
            ip = socket.gethostbyname(name)
        except OSError:
            continue
        if not ip.startswith("127."):
            return ip
        break
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
