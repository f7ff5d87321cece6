"""Ray nodes that tests start with ``ray start`` in sessions of their own, and stop by PID.

Never ``ray stop``: it stops every Ray process on the machine, other people's included.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct ports free now (all held open together while picking)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: everything `ray start` spawned, workers included."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def stop_session(sid: int) -> None:
    """Stop the processes of our own `ray start` session by PID (never `ray stop`: it stops every Ray here)."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return
