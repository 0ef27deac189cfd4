"""The request schema, in one place with the reply schema (replies.py); the README's "Formats" documents both.

A request to /predictions/{model} or /explanations/{model} carries one image, as any of:
  * seed JSON: {"img_data": nested pixel lists in the archive's seed layout, ...options}; the classifier
    seeds also send "target_class" (a class name). A seed request gets the seed reply.
  * native JSON: {"image": "<base64 JPEG/PNG>", ...options}.
  * a raw image body, or a multipart form with an "image" field and options as further form fields
    (TorchServe 0.12 drops URL query parameters before a handler can see them).
Options are validated here; an unknown option or a bad value is a 400 that names it.
"""
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import values
from ..decode import PixelLayout, decode_base64_image, decode_image_bytes, decode_pixel_lists
from ..errors import RequestError
from ..quadrature import ADAPTIVE_METHOD, ADAPTIVE_MIN_STEPS, METHODS
from ..settings import BASELINES, Limits

PAYLOAD_FIELDS = ("body", "data")
SEED_IMAGE_FIELD = "img_data"
NATIVE_IMAGE_FIELD = "image"
PATH_OPTIONS = ("n_steps", "method", "tolerance", "max_steps", "baseline", "internal_batch_size", "return_path", "idg_hierarchy")
"""The explanation options every archive accepts (the path integral's); each archive adds its own."""
EXPLANATION_ONLY_OPTIONS = PATH_OPTIONS + ("target", "idg_grid", "region_reduction", "instance")
"""Options that only change an explanation: a prediction request that sends one gets a 400, not silence."""
TARGET_ALIAS = "target_class"  # the classifier seeds' name of `target`, accepted wherever `target` is


def option_checks(limits: Limits) -> dict[str, values.Check]:
    """Every option an archive may accept, with its check; each archive accepts a subset."""
    return {
        "n_steps": values.integer(1, limits.max_steps),
        "method": values.choice(*METHODS, ADAPTIVE_METHOD),
        "tolerance": values.number(1e-6, 1.0),
        "max_steps": values.integer(ADAPTIVE_MIN_STEPS, limits.max_steps),
        "idg_hierarchy": values.integer(1, 1000),
        "target": values.class_reference,
        "baseline": values.choice(*BASELINES),
        "internal_batch_size": values.integer(1, limits.max_internal_batch_size),
        "return_path": values.boolean,
        "threshold": values.number(0.0, 1.0),
        "region_reduction": values.choice("sum", "mean"),
        "instance": values.integer(0),
        "idg_grid": values.integer(1, 32),
        "native_resolution": values.boolean,
        "points": values.extreme_points,
        "label": values.integer(1, 255),
        "image_size": values.integer(16, 1024),
    }


@dataclass
class ParsedRequest:
    """One decoded request: the image as (H, W, 3) uint8 RGB, whether it used the seed format, its options."""

    image: np.ndarray
    seed_format: bool
    options: dict[str, Any] = field(default_factory=dict)


def parse_request(fields: dict, layout: PixelLayout, accepted_options: tuple[str, ...], limits: Limits, content_type: str | None = None) -> ParsedRequest:
    """Decode a TorchServe request dict (body/data payload plus form fields and query parameters); `content_type`
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
    return ParsedRequest(image=image, seed_format=seed_format, options=parse_options(loose, accepted_options, limits))


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


def refuse_explanation_options(options: dict[str, Any], predicts_targets: bool = False) -> None:
    """A prediction ignores explanation options: refuse them rather than drop them silently. A classifier's
    prediction reports its `target` (the classifier seeds send target_class with every request)."""
    given = sorted(set(options) & set(EXPLANATION_ONLY_OPTIONS) - ({"target"} if predicts_targets else set()))
    if given:
        raise RequestError(f"option(s) {given} only apply to explanations; send them to /explanations/<model>, or leave them out of a prediction")


def parse_options(raw: dict, accepted_options: tuple[str, ...], limits: Limits) -> dict[str, Any]:
    """Validate option values; unknown options are refused so that nothing a client sent is ignored."""
    accepted = set(accepted_options) | ({TARGET_ALIAS} if "target" in accepted_options else set())
    unknown = sorted(set(raw) - accepted)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; this model accepts {sorted(accepted)}")
    if TARGET_ALIAS in raw and "target" in raw:
        raise RequestError(f"give the target as 'target' or '{TARGET_ALIAS}', not both")
    checks = option_checks(limits)
    options = {}
    for name, value in raw.items():
        key = "target" if name == TARGET_ALIAS else name
        try:
            options[key] = checks[key](value)
        except ValueError as error:
            raise RequestError(f"option '{name}' {error}") from None
    return options
