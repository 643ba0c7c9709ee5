"""Encoders and decoders: msgpack header frame, numpy arrays as raw side frames (never pickled).

An array inside a message becomes `Ext(ARRAY_EXT, meta + index)`; its bytes travel as frame `index`
after the header, sent with `copy=False`. Arrays under `INLINE_LIMIT` bytes stay inline.
"""

import logging
from typing import Any, Generic, Sequence, TypeVar

import msgspec
import numpy as np

logger = logging.getLogger(__name__)

ARRAY_EXT = 1
INLINE_ARRAY_EXT = 2
INLINE_LIMIT = 256

T = TypeVar("T")
_ARRAY_META = msgspec.msgpack.Decoder(tuple[str, tuple[int, ...]])
Frame = bytes | memoryview


class Encoder:
    """Encodes one message into `[header, *array_buffers]`."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._buffers: list[Frame] = []

    def encode(self, message: Any) -> list[Frame]:
        self._buffers = []
        header = self._encoder.encode(message)
        buffers, self._buffers = self._buffers, []
        return [header, *buffers]

    def _enc_hook(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            raise TypeError(f"cannot encode {type(obj).__name__}")
        meta = msgspec.msgpack.encode((obj.dtype.str, obj.shape))
        meta = len(meta).to_bytes(2, "little") + meta
        data = np.ascontiguousarray(obj)
        if data.nbytes < INLINE_LIMIT:
            return msgspec.msgpack.Ext(INLINE_ARRAY_EXT, meta + data.tobytes())
        self._buffers.append(memoryview(data).cast("B"))
        index = len(self._buffers)
        return msgspec.msgpack.Ext(ARRAY_EXT, meta + index.to_bytes(4, "little"))


class Decoder(Generic[T]):
    """Decodes `[header, *buffers]` into the socket's one message type (a tagged union)."""

    def __init__(self, message_type: type[T]) -> None:
        self._decoder = msgspec.msgpack.Decoder(message_type, ext_hook=self._ext_hook)
        self._frames: Sequence[Frame] = ()

    def decode(self, frames: Sequence[Frame]) -> T:
        """Raises msgspec.DecodeError / ValidationError on a malformed frame."""
        self._frames = frames
        try:
            return self._decoder.decode(frames[0])
        finally:
            self._frames = ()

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code not in (ARRAY_EXT, INLINE_ARRAY_EXT):
            raise msgspec.DecodeError(f"unknown extension type {code}")
        meta_len = int.from_bytes(data[:2], "little")
        dtype, shape = _ARRAY_META.decode(data[2 : 2 + meta_len])
        rest = data[2 + meta_len :]
        if code == INLINE_ARRAY_EXT:
            return np.frombuffer(rest, dtype=dtype).reshape(shape).copy()
        index = int.from_bytes(bytes(rest), "little")
        if not 1 <= index < len(self._frames):
            raise msgspec.DecodeError(f"array frame {index} missing")
        return np.frombuffer(self._frames[index], dtype=dtype).reshape(shape)


def encode_args(args: msgspec.Struct | None) -> bytes:
    return msgspec.msgpack.encode(args) if args is not None else b""


def decode_args(data: bytes, args_type: type[T]) -> T:
    """Utility arguments; empty bytes mean all defaults."""
    if not data:
        return msgspec.msgpack.decode(msgspec.msgpack.encode({}), type=args_type)
    return msgspec.msgpack.decode(data, type=args_type)
