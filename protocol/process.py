"""What every process does the same way: title, logging, parent watch, peer checks, sockets."""

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterable

import zmq

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5


def set_process_title(role: str) -> None:
    """`role` is e.g. "zeroserve-core" or "zeroserve-worker-0"; `ps` and `top` show it."""
    try:
        import setproctitle

        setproctitle.setproctitle(role)
    except ImportError:
        logger.debug("setproctitle missing: %s keeps its command line", role)


def configure_logging(role: str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def watch_parent_and_peers(
    peer_pids: Iterable[int] = (), on_loss: Callable[[str], None] | None = None
) -> threading.Thread:
    """Start a daemon thread that notices the parent's or a peer's death within WATCH_INTERVAL_S.

    The kernel also sends SIGTERM when the parent dies (PR_SET_PDEATHSIG). `on_loss` gets a
    description; by default the process exits at once with status 1.
    """
    parent = os.getppid()
    peers = list(peer_pids)
    _set_parent_death_signal(signal.SIGTERM)
    handler = on_loss or _exit_now

    def watch() -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            if os.getppid() != parent:
                handler(f"parent {parent} is gone")
                return
            dead = [pid for pid in peers if not pid_alive(pid)]
            if dead:
                handler(f"peer process {dead[0]} is gone")
                return

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def _exit_now(reason: str) -> None:
    logger.error("exiting: %s", reason)
    logging.shutdown()
    os._exit(1)


def _set_parent_death_signal(sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        logger.debug("prctl unavailable; relying on the watch thread")


def make_socket(
    context: zmq.Context, kind: int, address: str, bind: bool, identity: bytes | None = None
) -> zmq.Socket:
    """A socket with linger 0, bound or connected to `address`."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock


def report_to_launch(context: zmq.Context, launch_address: str, frames: list) -> None:
    """Send one `ProcessReady` (already encoded) to launch; give up after 5 s."""
    sock = make_socket(context, zmq.PUSH, launch_address, bind=False)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    try:
        sock.send_multipart(frames)
    except zmq.Again:
        logger.error("launch at %s did not take the ready report", launch_address)
    finally:
        # A queued report is dropped by close() with linger 0: give it time to leave.
        sock.close(linger=5000)
