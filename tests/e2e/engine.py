"""Start `zeroserve serve` as a real process tree and always stop it."""

import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from protocol.process import pid_alive

START_TIMEOUT_S = 300


def free_port_range(count: int) -> int:
    """A base port with `count` consecutive free ports after it."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65000 and all(_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class Engine:
    process: subprocess.Popen
    addresses: list[str]
    log: list[str] = field(default_factory=list)
    children: dict[str, int] = field(default_factory=dict)

    def descendants(self) -> list[int]:
        """Pids of the engine's processes (launch's children when it became ready) still alive."""
        return [pid for pid in self.children.values() if pid_alive(pid)]

    def child_pid(self, role: str) -> int:
        return self.children[role]

    @property
    def run_dir(self) -> str:
        """The folder of the engine's ipc sockets, from launch's start-up log line."""
        for line in self.log:
            if "sockets in " in line:
                return line.rsplit("sockets in ", 1)[1].strip()
        raise LookupError("launch did not log its socket folder")

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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


def start_engine(model: Path, *options: str, frontends: int = 1) -> Engine:
    """`zeroserve serve` on `model`; returns once every frontend printed its address."""
    port = free_port_range(frontends)
    command = [sys.executable, "-m", "launch.cli", "serve", "--model", str(model), "--port", str(port),
               "--frontends", str(frontends), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = Engine(process, [])
    ready = threading.Event()

    def read_output() -> None:
        for line in process.stdout:
            engine.log.append(line)
            sys.stderr.write("[engine] " + line)
            if line.startswith("frontend-") and ": tcp://" in line:
                engine.addresses.append(line.split(": ", 1)[1].strip())
                if len(engine.addresses) == frontends:
                    ready.set()
        ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or len(engine.addresses) < frontends:
        engine.stop()
        raise RuntimeError("engine did not start:\n" + "".join(engine.log[-30:]))
    engine.addresses.sort(key=lambda a: int(a.rsplit(":", 1)[1]))
    engine.children = _children_by_title(process.pid)
    return engine
