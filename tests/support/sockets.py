"""Which process holds the server end of a TCP connection on 127.0.0.1 (Linux /proc), to tell
which of a pod's workers accepted it."""

from __future__ import annotations

import os
from pathlib import Path


def _hex_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def server_socket_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the accepted socket whose peer is ``client_port`` (IPv4, /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if _hex_port(fields[1]) == server_port and _hex_port(fields[2]) == client_port:
            return int(fields[9])
    return None


def holder(pids: list[int], inode: int) -> int | None:
    """The pid among ``pids`` with a descriptor on socket ``inode``."""
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(fd_dir / name) == target:
                    return pid
            except OSError:
                continue
    return None
