"""Payload encoding: gzip(torch.save(dict)) as the seeds wrote it (with a fast compressor), .npz, JSON, PNG."""
import io
import json

import numpy as np
import torch
from isal import igzip
from PIL import Image

from .errors import RequestError

GZIP_LEVEL = 1
CONTENT_TYPES = {"gzip": "application/gzip", "npz": "application/x-npz", "json": "application/json", "png": "image/png"}


def to_cpu(payload):
    """Detach every tensor in a nested dict/list and move it to the CPU."""
    if isinstance(payload, torch.Tensor):
        return payload.detach().cpu()
    if isinstance(payload, dict):
        return {key: to_cpu(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [to_cpu(value) for value in payload]
    return payload


def encode_gzip_torch(payload: dict) -> bytes:
    """gzip(torch.save(payload)): readable with gzip.open + torch.load, as the seed clients do."""
    buffer = io.BytesIO()
    torch.save(to_cpu(payload), buffer)
    return igzip.compress(buffer.getbuffer(), compresslevel=GZIP_LEVEL)


def _flatten(payload: dict, prefix: str = "") -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            arrays.update(_flatten(value, name + "/"))
        elif isinstance(value, torch.Tensor):
            arrays[name] = value.detach().cpu().numpy()
        else:
            arrays[name] = np.asarray(value)
    return arrays


def encode_npz(payload: dict) -> bytes:
    """An uncompressed .npz; nested dicts become 'outer/inner' array names."""
    buffer = io.BytesIO()
    np.savez(buffer, **_flatten(payload))
    return buffer.getvalue()


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def encode_json(payload: dict) -> bytes:
    """JSON with tensors as nested lists."""
    return json.dumps(_jsonable(payload)).encode("utf-8")


def encode_png(image: np.ndarray) -> bytes:
    """A PNG of an (H, W) uint8 or (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def check_reply_size(body: bytes, limit: int) -> bytes:
    """Refuse a reply over the server's response limit with 413 instead of letting it kill the worker."""
    if len(body) > limit:
        raise RequestError(
            f"the reply would be {len(body)} bytes, over this server's response limit of {limit} bytes; "
            "ask for less: return_path=false drops the path gradients and intermediates, or lower n_steps",
            status=413,
        )
    return body
