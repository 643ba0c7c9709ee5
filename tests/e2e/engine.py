"""Start `zeroserve serve` as a real process tree and always stop it."""

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.local import LocalEngine, free_port_range, start_local_engine
from protocol.process import pid_alive


@dataclass
class Engine(LocalEngine):
    children: dict[str, int] = field(default_factory=dict)  # process title -> pid, once started
    http_url: str | None = None  # with http=True: every frontend's HTTP server

    def descendants(self) -> list[int]:
        """Pids of the engine's processes (launch's children when it became ready) still alive."""
        return [pid for pid in self.children.values() if pid_alive(pid)]

    def child_pid(self, role: str) -> int:
        return self.children[role]

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, grace_s: float = 15.0) -> int:
        """serve's stop, then SIGKILL for any of its processes still alive (the test failed)."""
        status = super().stop(grace_s)
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return status


def _children_by_title(parent: int) -> dict[str, int]:
    """`{process title: pid}` of `parent`'s children (their titles say their roles)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent:
            found[title] = int(entry)
    return found


def start_engine(model: Path, *options: str, frontends: int = 1, http: bool = False) -> Engine:
    """`zeroserve serve` on `model`; returns once every frontend printed its address. With `http`,
    on a free HTTP port too."""
    port = free_port_range(1) if http else None
    options = options + (("--http-port", str(port)) if http else ())
    local = start_local_engine(str(model), options, frontends, echo=lambda line: sys.stderr.write("[engine] " + line))
    url = f"http://127.0.0.1:{port}" if http else None
    return Engine(**vars(local), children=_children_by_title(local.process.pid), http_url=url)
