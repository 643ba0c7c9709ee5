"""Start `zeroserve serve` as a real process tree and always stop it."""

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
    marker: str
    log: list[str] = field(default_factory=list)

    def descendants(self) -> list[int]:
        """Pids of the engine's processes still alive (found by their title and environment)."""
        return [pid for pid, _ in _zeroserve_processes() if self._ours(pid)]

    def _ours(self, pid: int) -> bool:
        return _environ_marker(pid) == self.marker

    def child_pid(self, role: str) -> int:
        for pid, title in _zeroserve_processes():
            if title.startswith(role) and self._ours(pid):
                return pid
        raise LookupError(f"no {role} process")

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


def _zeroserve_processes() -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if title.startswith("zeroserve-") and state != "Z":
            found.append((int(entry), title))
    return found


def _environ_marker(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"ZEROSERVE_TEST_OWNER="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return ""


def start_engine(model: Path, *options: str, frontends: int = 1) -> Engine:
    """`zeroserve serve` on `model`; returns once every frontend printed its address."""
    port = free_port_range(frontends)
    command = [sys.executable, "-m", "launch.cli", "serve", "--model", str(model), "--port", str(port),
               "--frontends", str(frontends), *options]
    marker = uuid.uuid4().hex
    env = dict(os.environ, ZEROSERVE_TEST_OWNER=marker)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    engine = Engine(process, [], marker)
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
    return engine
