"""The reply schema, in one place with the request schema (requests.py); docs/formats.md documents both.

Every reply is a dict of tensors, numbers, strings, lists and dicts, encoded by the client's Accept header
(encode.py): gzip(torch.save) as the seeds wrote it, .npz, JSON, or a PNG label image for segmenters.
This module names the reply encodings and the keys of the seed replies, and picks the encoding.
"""
from typing import Any, Optional

from .errors import RequestError
from .seed_apis import MAX_PREDICTION_TYPE

REPLY_TYPES = {
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/x-npz": "npz",
    "application/npz": "npz",
    "application/json": "json",
    "image/png": "png",
    "application/vnd.opex+json": "opex",
    MAX_PREDICTION_TYPE: "max",
}
CONTENT_TYPES = {
    "gzip": "application/gzip", "npz": "application/x-npz", "json": "application/json", "png": "image/png",
    "opex": "application/vnd.opex+json", "kserve_v2": "application/json", "max": "application/json",
}
EXPLANATION_TYPES = ("gzip", "npz", "json")

SEED_CLASSIFIER_EXPLANATION_KEYS = ("integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output", "target_class")
"""The seed reply of int-gradients-image-server (bit, lanet), key for key."""
PATH_KEYS = ("integrated_directional_grads", "intermediates")
"""The path tensors, (n, C, h, w) each: sent only with return_path."""


def negotiate_reply_type(accept: Optional[str], default: str, available: tuple[str, ...]) -> str:
    """Pick a reply encoding (gzip, npz, json, png) from an Accept header; 406 when none is available."""
    if not accept:
        return default
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", ""):
            return default
        if REPLY_TYPES.get(media) in available:
            return REPLY_TYPES[media]
    offered = sorted(media for media, kind in REPLY_TYPES.items() if kind in available)
    raise RequestError(f"cannot reply in {accept!r}; this endpoint offers {offered}", status=406)


def seed_explanation(payload: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The seed's reply: exactly its keys, less the path tensors when the client asked for return_path=false."""
    return {key: payload[key] for key in keys if key in payload or key not in PATH_KEYS}
