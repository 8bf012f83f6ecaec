"""Framing between the Locust users and the pgsd server process.

A message is a JSON object, sent as a 4-byte big-endian length followed by
that many bytes of UTF-8 JSON. One request, then one response, per socket
connection at a time.

The decoder is sans-I/O (bytes in, messages out), so that the gevent side
(blocking sockets that gevent makes cooperative) and the anyio side share
it. This module imports nothing but the standard library: the server
process imports it and must never load gevent.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Final

__all__ = [
    "MAX_FRAME",
    "Channel",
    "ChannelClosed",
    "FrameDecoder",
    "ProtocolError",
    "encode",
]

#: The largest message accepted, in bytes (a stats reply is a few hundred).
MAX_FRAME: Final = 1 << 20
_HEADER: Final = struct.Struct(">I")
_RECV_CHUNK: Final = 65536


class ProtocolError(Exception):
    """A frame that is too large, not JSON, or not a JSON object."""


class ChannelClosed(Exception):
    """The peer closed the connection (or died) before answering."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame holding ``message``.

    Raises:
        ProtocolError: the encoded message is larger than `MAX_FRAME`.
        TypeError: a value is not JSON-serialisable.
    """
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame is not a JSON object: {type(message).__name__}")
    return message


class FrameDecoder:
    """Turns received bytes into messages, whatever the chunking."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        """Whether part of a frame is buffered (EOF now would cut a message)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buffer += data

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or None when more bytes are needed.

        Raises:
            ProtocolError: the frame announces more than `MAX_FRAME` bytes, or
                its payload is not a JSON object.
        """
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(buffer)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
        end = _HEADER.size + size
        if len(buffer) < end:
            return None
        payload = bytes(buffer[_HEADER.size : end])
        del buffer[:end]
        return _decode(payload)


class Channel:
    """A blocking request/response connection to the server process's Unix socket.

    In a Locust process gevent has patched ``socket``, so a blocked call
    yields to the other greenlets instead of stopping the process.

    Args:
        path: the server's socket.
        timeout: seconds any single send or receive may block.

    Raises:
        OSError: the socket cannot be reached.
    """

    def __init__(self, path: str, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        self._decoder = FrameDecoder()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` and return the reply.

        On any error the channel is closed: a half-read reply would
        desynchronise every later one.

        Raises:
            ChannelClosed: the channel or the peer is closed.
            ProtocolError: the reply is not a valid frame.
            TimeoutError: the peer did not answer within the timeout.
            OSError: another socket error.
        """
        sock = self._sock
        if sock is None:
            raise ChannelClosed("the channel is closed")
        try:
            sock.sendall(encode(message))
            return self._receive(sock)
        except BaseException:
            self.close()
            raise

    def _receive(self, sock: socket.socket) -> dict[str, Any]:
        while True:
            reply = self._decoder.next_message()
            if reply is not None:
                return reply
            data = sock.recv(_RECV_CHUNK)
            if not data:
                raise ChannelClosed("the pgsd server process closed the connection")
            self._decoder.feed(data)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
