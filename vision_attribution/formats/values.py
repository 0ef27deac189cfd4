"""Value checks shared by request options (formats/requests.py) and archive settings (settings.py).

Each check takes a raw value (JSON value, form-field text or YAML value) and returns the parsed value,
or raises ValueError with a message that says what was expected; the caller adds the option's name.
"""
import json
import math
from typing import Any, Callable, Optional

from .decode import decode_base64_image, decode_image_bytes
from .errors import RequestError

Check = Callable[[Any], Any]


def _text(value):
    """Form fields arrive as bytes; JSON and YAML values as themselves."""
    return value.decode("utf-8", "replace").strip() if isinstance(value, (bytes, bytearray)) else value


def _shown(value, most: int = 80) -> str:
    """A value as an error message shows it: its repr, shortened (a number may have thousands of digits)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= most else text[: most - 3] + "..."


def _is_finite(number) -> bool:
    """Whether a JSON number is finite as a float (a huge integer is not: it does not fit one)."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


def _list(value, what: str) -> list:
    """List-valued options arrive as JSON lists, or as JSON text in a form field."""
    value = _text(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"must be {what} (JSON), got {value[:80]!r}") from None
        except RecursionError:
            raise ValueError(f"must be {what}; the JSON given is nested too deeply to parse") from None
    if not isinstance(value, list):
        raise ValueError(f"must be {what}, got {value!r}")
    return value


def integer(low: int, high: Optional[int] = None) -> Check:
    def check(value) -> int:
        value = _text(value)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"must be an integer, got {_shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_shown(value)}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}, got {_shown(value)}" if high is not None else f"must be at least {low}, got {_shown(value)}")
        return value

    return check


def number(low: float, high: float) -> Check:
    def check(value) -> float:
        value = _text(value)
        if isinstance(value, bool):
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {value!r}")
        try:
            parsed = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {_shown(value)}") from None
        if not math.isfinite(parsed) or not low <= parsed <= high:
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {_shown(value)}")
        return parsed

    return check


def optional(check: Check) -> Check:
    """`check`, or None for a YAML null."""

    def check_or_none(value):
        return None if value is None else check(value)

    return check_or_none


def choice(*choices: str) -> Check:
    def check(value) -> str:
        value = _text(value)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def boolean(value) -> bool:
    value = _text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"must be true or false, got {value!r}")


def class_reference(value):
    """A class (or segment) given by name or by index; the adapter resolves it."""
    value = _text(value)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a class name or index, got {value!r}")
    return value


def extreme_points(value) -> list[list[float]]:
    """Four [x, y] points of finite numbers, not all equal (DEXTR's extreme points, in any order)."""
    what = "four [x, y] points, e.g. [[10, 40], [60, 5], [110, 42], [58, 90]]"
    points = _list(value, what)
    if len(points) != 4 or not all(isinstance(point, list) and len(point) == 2 for point in points):
        raise ValueError(f"must be {what}; got {points!r}")
    numbers = [coordinate for point in points for coordinate in point]
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not _is_finite(c) for c in numbers):
        raise ValueError(f"must hold finite numbers only; got {_shown(points)}")
    if all(point == points[0] for point in points):
        raise ValueError(f"must be four different points around an object; all four are {points[0]}")
    return [[float(x), float(y)] for x, y in points]


def images(max_pixels: int, most: int, name: str) -> Check:
    """The uploaded images of option `name`: a file (a multipart field's bytes), a base64 string, or a list of up to
    `most` base64 strings -> a list of (H, W, 3) uint8 RGB arrays. An image that does not decode is its own 400 or
    413 (a RequestError that names the option and the image)."""

    def check(value) -> list:
        items = value if isinstance(value, list) else [value]
        if not 1 <= len(items) <= most:
            raise ValueError(f"must be 1 to {most} images, got {len(items)}")
        decoded = []
        for position, item in enumerate(items):
            if not isinstance(item, (bytes, bytearray, str)):
                raise ValueError(f"must be an image file, a base64 image or a list of them, got {_shown(item)}")
            try:
                if isinstance(item, str):
                    decoded.append(decode_base64_image(item, max_pixels, field=name))
                else:
                    decoded.append(decode_image_bytes(bytes(item), max_pixels))
            except RequestError as error:
                where = f" (image {position} of {len(items)})" if len(items) > 1 else ""
                raise RequestError(f"option '{name}'{where}: {error.message}", error.status) from None
        return decoded

    return check
