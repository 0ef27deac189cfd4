"""Value checks shared by request options (formats/requests.py) and archive settings (settings.py).

Each check takes a raw value (JSON value, form-field text or YAML value) and returns the parsed value,
or raises ValueError with a message that says what was expected; the caller adds the option's name.
"""
import math
from typing import Any, Callable, Optional

Check = Callable[[Any], Any]


def _text(value):
    """Form fields arrive as bytes; JSON and YAML values as themselves."""
    return value.decode("utf-8", "replace").strip() if isinstance(value, (bytes, bytearray)) else value


def integer(low: int, high: Optional[int] = None) -> Check:
    def check(value) -> int:
        value = _text(value)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}, got {value}" if high is not None else f"must be at least {low}, got {value}")
        return value

    return check


def number(low: float, high: float) -> Check:
    def check(value) -> float:
        value = _text(value)
        if isinstance(value, bool):
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {value!r}")
        try:
            parsed = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {value!r}") from None
        if not math.isfinite(parsed) or not low <= parsed <= high:
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {value!r}")
        return parsed

    return check


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
