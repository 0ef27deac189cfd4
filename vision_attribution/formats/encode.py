"""Payload encoding: gzip(torch.save(dict)) as the seeds wrote it (with a fast compressor), .npz, JSON, PNG."""
import io
import json

import numpy as np
import torch
from isal import igzip
from PIL import Image

GZIP_LEVEL = 1


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


def flatten_reply(payload: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A reply dict -> {name: array}: nested dicts become 'outer/inner', a list of records one 'list/field'
    array per field, lists of strings unicode arrays (the .npz and KServe v2 replies)."""
    arrays = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            arrays.update(flatten_reply(value, name + "/"))
            continue
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            columns = {column: [item.get(column) for item in value] for column in value[0]}  # records -> columns
            arrays.update(flatten_reply(columns, name + "/"))
            continue
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"reply field {name!r} is not a plain array (object dtype); np.load would need pickle to read it")
        arrays[name] = array
    return arrays


def encode_npz(payload: dict) -> bytes:
    """An uncompressed .npz readable by np.load without pickle: nested dicts become 'outer/inner' arrays,
    a list of records (dicts) becomes one 'list/field' array per field, lists of strings unicode arrays."""
    buffer = io.BytesIO()
    np.savez(buffer, **flatten_reply(payload))
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


def encode_error(message: str, request_id: str | None = None) -> bytes:
    """JSON error body {"error": message} (plus "request_id" for errors logged on the server)."""
    return json.dumps({"error": message} if request_id is None else {"error": message, "request_id": request_id}).encode("utf-8")
