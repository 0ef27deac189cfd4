"""Corpora of bad and awkward requests: each case is one request and what must come back, sent to a real TorchServe
or the gateway; after each, the worker that answered is the same process and the model serves its probe as before."""
import dataclasses
import io
import struct
import zlib
from typing import Callable, Optional

import requests
from PIL import Image


@dataclasses.dataclass
class Case:
    """One request and what must come back: `status`, and `expect` in the JSON error's message (4xx) or, for a 200, a
    check of the reply (None: any 200). `route`: the model's `/predictions` or `/explanations`, or a gateway path."""

    model: str
    status: int
    expect: Optional[str | Callable[[requests.Response], None]]
    data: object = None
    files: Optional[dict] = None
    headers: dict = dataclasses.field(default_factory=dict)
    kind: str = "predictions"


def error_message(reply: requests.Response, key: str = "error") -> str:
    """The message of a JSON error reply (`key`: the field that holds it: error, message)."""
    assert reply.headers["content-type"].startswith("application/json"), (reply.headers["content-type"], reply.text[:300])
    return str(reply.json()[key])


def check_reply(case: Case, reply: requests.Response, message_key: str = "error") -> None:
    """The reply has the case's status; a 4xx names the problem (`expect` in its JSON message); a 200 passes `expect`."""
    assert reply.status_code == case.status, reply.text[:500]
    if case.status != 200:
        assert case.expect in error_message(reply, message_key), reply.text[:500]
    elif callable(case.expect):
        case.expect(reply)


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height RGB pixels but whose data is empty: refusing it with 413
    (not 400 "truncated") shows that the size was checked from the header, before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def pixel_bomb_png() -> bytes:
    """12000 x 12000 one-bit pixels in 20 kB."""
    return encoded(Image.new("1", (12000, 12000)), "PNG")
