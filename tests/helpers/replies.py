"""Replies read as the project's client reads them: vision_attribution.clients.cli.load_reply (gzip(torch.save(dict)),
.npz or JSON), which reads a saved reply from a file."""
import tempfile
from pathlib import Path

from vision_attribution.clients.cli import load_reply

SEED_JSON = {"Content-Type": "application/json; chartset=utf-8"}
"""The Content-Type header of the seeds' curl lines, typo included."""


def read_reply(body: bytes) -> dict:
    """A reply body read by the client's load_reply (saved to a temporary file first, as `vision-attribution send`
    saves it)."""
    with tempfile.TemporaryDirectory(prefix="reply-") as folder:
        path = Path(folder) / "reply"
        path.write_bytes(body)
        return load_reply(path)
