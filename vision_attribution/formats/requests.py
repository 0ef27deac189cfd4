"""The request schema, in one place with the reply schema (replies.py); docs/formats.md documents both.

A request to /predictions/{model} or /explanations/{model} carries one image, as any of:
  * seed JSON: {"img_data": nested pixel lists in the archive's seed layout, ...options}; the classifier
    seeds also send "target_class" (a class name). A seed request gets the seed reply.
  * native JSON: {"image": "<base64 JPEG/PNG>", ...options}.
  * a raw image body, or a multipart form with an "image" field and options as further form fields
    (TorchServe 0.12 drops URL query parameters before a handler can see them).
Options are validated here with the checks the service declares (serving/options.py); an unknown option or a
bad value is a 400 that names it.
"""
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .values import Check
from .decode import PixelLayout, decode_base64_image, decode_image_bytes, decode_pixel_lists
from .errors import RequestError

PAYLOAD_FIELDS = ("body", "data")
SEED_IMAGE_FIELD = "img_data"
NATIVE_IMAGE_FIELD = "image"
TARGET_ALIAS = "target_class"  # the classifier seeds' name of `target`, accepted wherever `target` is


@dataclass
class ParsedRequest:
    """One decoded request: the image as (H, W, 3) uint8 RGB, whether it used the seed format, its options."""

    image: np.ndarray
    seed_format: bool
    options: dict[str, Any] = field(default_factory=dict)


def parse_request(
    fields: dict, layout: PixelLayout, checks: Mapping[str, Check], max_pixels: int, content_type: str | None = None
) -> ParsedRequest:
    """Decode a TorchServe request dict (body/data payload plus form fields and query parameters) into the image
    and the options, each validated by its check in `checks` (the options the archive accepts); `content_type`
    (the request's header) only makes the error for a request without an image more precise."""
    payload = next((fields[name] for name in PAYLOAD_FIELDS if fields.get(name) is not None), None)
    loose = {name: value for name, value in fields.items() if name not in PAYLOAD_FIELDS}
    if payload is None and NATIVE_IMAGE_FIELD in loose:
        payload = loose.pop(NATIVE_IMAGE_FIELD)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray)) and bytes(payload[:64]).lstrip()[:1] in (b"{", b"["):
        payload = parse_json(bytes(payload))

    if isinstance(payload, dict):
        document = dict(payload)
        if SEED_IMAGE_FIELD in document and NATIVE_IMAGE_FIELD in document:
            raise RequestError(f"send either '{SEED_IMAGE_FIELD}' or '{NATIVE_IMAGE_FIELD}', not both")
        if SEED_IMAGE_FIELD in document:
            image = decode_pixel_lists(document.pop(SEED_IMAGE_FIELD), layout, max_pixels)
            seed_format = True
        elif NATIVE_IMAGE_FIELD in document:
            image = decode_base64_image(document.pop(NATIVE_IMAGE_FIELD), max_pixels)
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
        image, seed_format = decode_image_bytes(bytes(payload), max_pixels), False
    elif payload is None and loose:
        names = sorted(name if len(name) <= 40 else name[:37] + "..." for name in loose)
        raise RequestError(
            f"the request has no image, only the field(s) {names}; send the image as the body, as the multipart "
            f"field '{NATIVE_IMAGE_FIELD}', or as JSON ('{SEED_IMAGE_FIELD}' or '{NATIVE_IMAGE_FIELD}')"
        )
    elif payload is None and (content_type or "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        raise RequestError(
            "the request arrived empty: its Content-Type is application/x-www-form-urlencoded (what curl --data sends "
            "by default), whose body TorchServe reads as NAME=VALUE form fields and drops otherwise; send JSON with "
            "'Content-Type: application/json', or the image as the body (curl -T) or as the multipart field 'image'"
        )
    elif payload is None:
        raise RequestError("the request is empty; send an image body, a multipart 'image' field or a JSON request")
    else:
        raise RequestError(f"a JSON request must be an object, got {type(payload).__name__}")
    return ParsedRequest(image=image, seed_format=seed_format, options=parse_options(loose, checks))


def parse_json(body: bytes) -> Any:
    """Parse a JSON request body; malformed, non-UTF-8 or absurdly nested JSON is a 400."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RequestError(f"the request body is not valid JSON: it is not UTF-8 ({error})") from error
    except json.JSONDecodeError as error:
        raise RequestError(f"the request body is not valid JSON ({error})") from error
    except RecursionError:
        raise RequestError("the JSON request is nested too deeply to parse; an image is 3 levels of lists") from None


def parse_options(raw: dict, checks: Mapping[str, Check]) -> dict[str, Any]:
    """Validate option values with their checks; unknown options are refused so that nothing a client sent is ignored."""
    accepted = set(checks) | ({TARGET_ALIAS} if "target" in checks else set())
    unknown = sorted(set(raw) - accepted)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; this model accepts {sorted(accepted)}")
    if TARGET_ALIAS in raw and "target" in raw:
        raise RequestError(f"give the target as 'target' or '{TARGET_ALIAS}', not both")
    options = {}
    for name, value in raw.items():
        key = "target" if name == TARGET_ALIAS else name
        try:
            options[key] = checks[key](value)
        except ValueError as error:
            raise RequestError(f"option '{name}' {error}") from None
    return options
