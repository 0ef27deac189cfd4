"""Request and reply formats, in one place (the README's "Formats" section documents the same).

Requests (to /predictions/{model} and /explanations/{model}):
  * seed JSON: {"img_data": nested pixel lists in the archive's seed layout, ...options}; the classifier
    seeds also send "target_class" (a class name). A seed request gets the seed reply, byte-compatible.
  * native JSON: {"image": "<base64 JPEG/PNG>", ...options}.
  * a raw JPEG/PNG body, or a multipart form with an "image" field and options as further form fields
    (TorchServe 0.12 drops URL query parameters before a handler can see them).
Options are validated here; an unknown option or a bad value is a 400 that names it.
"""
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .decode import PixelLayout, decode_base64_image, decode_image_bytes, decode_pixel_lists
from .errors import RequestError
from .quadrature import METHODS

PAYLOAD_FIELDS = ("body", "data")
SEED_IMAGE_FIELD = "img_data"
NATIVE_IMAGE_FIELD = "image"

BASELINES = ("zeros", "black")
"""zeros: all-zero tensor in the model's normalised input space (the seeds' baseline); black: a black image."""


def _text(value) -> str:
    return value.decode("utf-8", "replace").strip() if isinstance(value, (bytes, bytearray)) else value


def _integer(low: int, high: Optional[int] = None) -> Callable[[str, Any], int]:
    def parse(name, value):
        value = _text(value)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise RequestError(f"option '{name}' must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"option '{name}' must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            raise RequestError(f"option '{name}' must be between {low} and {high}, got {value}" if high else f"option '{name}' must be at least {low}, got {value}")
        return value

    return parse


def _fraction(name, value) -> float:
    value = _text(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"option '{name}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise RequestError(f"option '{name}' must be a number between 0 and 1, got {value!r}")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(name, value):
        value = _text(value)
        if value not in choices:
            raise RequestError(f"option '{name}' must be one of {', '.join(choices)}; got {value!r}")
        return value

    return parse


def _boolean(name, value) -> bool:
    value = _text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise RequestError(f"option '{name}' must be true or false, got {value!r}")


def _target(name, value):
    """A class (or segment) given by name or by index; the adapter resolves it."""
    value = _text(value)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"option '{name}' must be a class name or index, got {value!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """Per-archive bounds on what one request may ask for."""

    max_steps: int = 1024
    max_internal_batch_size: int = 512
    max_image_pixels: int = 36_000_000


def option_parsers(limits: Limits) -> dict[str, Callable[[str, Any], Any]]:
    """Every option an archive may accept, with its parser; each archive accepts a subset."""
    return {
        "n_steps": _integer(1, limits.max_steps),
        "method": _choice(METHODS),
        "target": _target,
        "target_class": _target,
        "baseline": _choice(BASELINES),
        "internal_batch_size": _integer(1, limits.max_internal_batch_size),
        "return_path": _boolean,
        "threshold": _fraction,
        "region_reduction": _choice(("sum", "mean")),
        "instance": _integer(0),
        "idg_grid": _integer(1, 32),
        "native_resolution": _boolean,
    }


@dataclass
class ParsedRequest:
    """One decoded request: the image as (H, W, 3) uint8 RGB, whether it used the seed format, its options."""

    image: np.ndarray
    seed_format: bool
    options: dict[str, Any] = field(default_factory=dict)


def parse_request(fields: dict, layout: PixelLayout, accepted_options: tuple[str, ...], limits: Limits) -> ParsedRequest:
    """Decode a TorchServe request dict (body/data payload plus form fields and query parameters)."""
    payload = next((fields[name] for name in PAYLOAD_FIELDS if fields.get(name) is not None), None)
    loose = {name: value for name, value in fields.items() if name not in PAYLOAD_FIELDS}
    if payload is None and NATIVE_IMAGE_FIELD in loose:
        payload = loose.pop(NATIVE_IMAGE_FIELD)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)) and bytes(payload[:64]).lstrip()[:1] in (b"{", b"["):
        try:
            payload = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON ({error})") from error

    if isinstance(payload, dict):
        document = dict(payload)
        if SEED_IMAGE_FIELD in document and NATIVE_IMAGE_FIELD in document:
            raise RequestError(f"send either '{SEED_IMAGE_FIELD}' or '{NATIVE_IMAGE_FIELD}', not both")
        if SEED_IMAGE_FIELD in document:
            image = decode_pixel_lists(document.pop(SEED_IMAGE_FIELD), layout, limits.max_image_pixels)
            seed_format = True
        elif NATIVE_IMAGE_FIELD in document:
            image = decode_base64_image(document.pop(NATIVE_IMAGE_FIELD), limits.max_image_pixels)
            seed_format = False
        else:
            raise RequestError(
                f"a JSON request needs '{SEED_IMAGE_FIELD}' ({layout.describe()}) or '{NATIVE_IMAGE_FIELD}' (a base64 JPEG/PNG); "
                f"got keys {sorted(document)}"
            )
        duplicated = sorted(set(document) & set(loose))
        if duplicated:
            raise RequestError(f"option(s) {duplicated} given both in the JSON body and as form/query fields")
        loose.update(document)
    elif isinstance(payload, (bytes, bytearray)):
        image, seed_format = decode_image_bytes(bytes(payload), limits.max_image_pixels), False
    elif payload is None:
        raise RequestError("the request is empty; send an image body, a multipart 'image' field or a JSON request")
    else:
        raise RequestError(f"a JSON request must be an object, got {type(payload).__name__}")
    return ParsedRequest(image=image, seed_format=seed_format, options=parse_options(loose, accepted_options, limits))


def parse_options(raw: dict, accepted_options: tuple[str, ...], limits: Limits) -> dict[str, Any]:
    """Validate option values; unknown options are refused so that nothing a client sent is ignored."""
    unknown = sorted(set(raw) - set(accepted_options))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; this model accepts {sorted(accepted_options)}")
    parsers = option_parsers(limits)
    options = {name: parsers[name](name, value) for name, value in raw.items()}
    if "target_class" in options:
        if "target" in options:
            raise RequestError("give the target as 'target' or 'target_class', not both")
        options["target"] = options.pop("target_class")
    return options


REPLY_TYPES = {
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/x-npz": "npz",
    "application/npz": "npz",
    "application/json": "json",
    "image/png": "png",
}


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
