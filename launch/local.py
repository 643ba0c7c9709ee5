"""`zeroserve serve` as a child process of a Python program: benchmarks, examples and tests.

    engine = start_local_engine(model_folder, ["--max-num-seqs", "8"], frontends=2)
    try:
        ...  # engine.addresses[i] is frontend i's `tcp://host:port`
    finally:
        engine.stop()

It picks free ports, reads the `frontend-<i>: <address>` lines that serve prints once it serves,
and keeps every line serve writes (stdout and stderr) in `log`.
"""

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0


@dataclass
class LocalEngine:
    process: subprocess.Popen
    num_frontends: int
    log: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # in frontend order once started
    reader: threading.Thread | None = None  # reads serve's output into `log`

    @property
    def run_dir(self) -> str:
        """The folder of the engine's ipc sockets, from serve's start-up log line."""
        for line in self.log:
            if "sockets in " in line:
                return line.rsplit("sockets in ", 1)[1].strip()
        raise LookupError("serve did not log its socket folder")

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; serve's children watch it and exit by themselves."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            # serve's last lines (its children may still hold the pipe a moment) end up in `log`.
            self.reader.join(timeout=grace_s)
        return self.process.returncode


def start_local_engine(
    model: str,
    options: Sequence[str] = (),
    frontends: int = 1,
    timeout_s: float = START_TIMEOUT_S,
    echo: Callable[[str], None] | None = None,
) -> LocalEngine:
    """serve `model` with `options` (not --port or --frontends); returns once every frontend
    announced its address. Each output line also goes to `echo`. Raises RuntimeError, with the
    log's tail, when serve exits or stays silent for `timeout_s`; it is stopped then."""
    command = [sys.executable, "-m", "launch.cli", "serve", "--model", model,
               "--port", str(free_port_range(frontends)), "--frontends", str(frontends), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = LocalEngine(process, frontends)
    ready = threading.Event()
    engine.reader = threading.Thread(target=_read_output, args=(engine, ready, echo), daemon=True)
    engine.reader.start()
    if not ready.wait(timeout_s) or len(engine.addresses) < frontends:
        engine.stop()
        raise RuntimeError(f"serve did not start (status {process.poll()}):\n" + "".join(engine.log[-30:]))
    engine.addresses.sort(key=lambda address: int(address.rsplit(":", 1)[1]))
    return engine


def _read_output(engine: LocalEngine, ready: threading.Event, echo: Callable[[str], None] | None) -> None:
    # Reading serve's output for its whole life keeps it from blocking on a full pipe.
    with engine.process.stdout:
        for line in engine.process.stdout:
            _take_line(engine, line, ready, echo)
    ready.set()


def _take_line(engine: LocalEngine, line: str, ready: threading.Event, echo: Callable[[str], None] | None) -> None:
    engine.log.append(line)
    if echo is not None:
        echo(line)
    name, _, address = line.partition(": ")
    if name.startswith("frontend-") and address.startswith("tcp://"):
        engine.addresses.append(address.strip())
        if len(engine.addresses) == engine.num_frontends:
            ready.set()


def free_port_range(count: int) -> int:
    """A base port with `count` consecutive free ports from it (frontend i listens on base + i)."""
    for _ in range(100):
        base = _free_port()
        if base + count < 65000 and all(_port_is_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
