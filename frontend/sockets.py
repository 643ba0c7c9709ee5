"""zmq.asyncio helpers: sending from synchronous code without losing errors; socket monitors."""

import asyncio
import logging
import uuid
from typing import Sequence

import zmq.asyncio

from protocol.codec import Frame

logger = logging.getLogger(__name__)


def send_now(sock: zmq.asyncio.Socket, frames: Sequence[Frame]) -> None:
    """Send `frames` in order with what is queued before them, without awaiting.

    An error the send hits at once (e.g. a ROUTER's unknown peer) is raised here; a send that
    had to queue and fails later is logged.
    """
    future = sock.send_multipart(list(frames), copy=False)
    if future.done():
        future.result()
    else:
        future.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("a queued send failed: %s", future.exception())


def monitor_socket(sock: zmq.asyncio.Socket, events: int) -> zmq.asyncio.Socket:
    """A PAIR socket receiving `sock`'s `events`, on an endpoint of its own (pyzmq's default name
    comes from a file descriptor number, which a later socket may reuse)."""
    return sock.get_monitor_socket(events, addr=f"inproc://monitor-{uuid.uuid4().hex}")
