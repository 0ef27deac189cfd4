"""Image decoding and validation: every way a request can carry an image ends as (H, W, 3) uint8 RGB."""
import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RequestError

DEFAULT_MAX_PIXELS = 36_000_000


@dataclass(frozen=True)
class PixelLayout:
    """How a nested pixel list is laid out: axes "HWC" or "CHW", channel order "RGB" or "BGR".

    `grey_and_alpha`: also accept (H, W) grey, 1-channel and 4-channel (RGBA/BGRA) lists and convert them.
    """

    axes: str
    order: str
    grey_and_alpha: bool = False

    def describe(self) -> str:
        return f"{self.order} pixels as {' x '.join(self.axes)} nested lists"


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Reject empty images and images over the pixel limit (before any pixel is decoded)."""
    if width < 1 or height < 1:
        raise RequestError(f"the image is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise RequestError(
            f"the image has {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; send a smaller image",
            status=413,
        )


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) to (H, W, 3) uint8 RGB; EXIF orientation applied, grey/alpha converted."""
    if not data:
        raise RequestError("the request body is empty; send an image or a JSON request")
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixel_count(image.width, image.height, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise RequestError(f"the provided input is not a valid image ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RequestError(f"the image could not be decoded, it may be truncated or corrupt ({error})") from error


def decode_base64_image(text: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a base64 string (optionally a data: URL) holding an encoded image to (H, W, 3) uint8 RGB."""
    if not isinstance(text, str):
        raise RequestError(f"'image' must be a base64-encoded image string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"'image' is not valid base64 ({error})") from error
    return decode_image_bytes(data, max_pixels)


def decode_pixel_lists(values, layout: PixelLayout, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "img_data") -> np.ndarray:
    """Turn nested lists of integer pixel values 0..255 in `layout` into (H, W, 3) uint8 RGB."""
    if not isinstance(values, list) or not values:
        raise RequestError(f"'{field}' must be a non-empty nested list of {layout.describe()}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise RequestError(f"'{field}' must be a rectangular nested list of numbers ({layout.describe()}): {error}") from error
    if layout.grey_and_alpha and array.ndim == 2:
        array = array[..., None] if layout.axes == "HWC" else array[None]
    if array.ndim != 3:
        raise RequestError(f"'{field}' has {array.ndim} nesting levels with shape {list(array.shape)}; expected 3: {layout.describe()}")
    hwc = array if layout.axes == "HWC" else array.transpose(1, 2, 0)
    height, width, channels = hwc.shape
    accepted = (1, 3, 4) if layout.grey_and_alpha else (3,)
    if channels not in accepted:
        raise RequestError(
            f"'{field}' has shape {list(array.shape)}, i.e. {channels} channels; expected {' or '.join(map(str, accepted))} ({layout.describe()})"
        )
    check_pixel_count(width, height, max_pixels)
    if not np.isfinite(hwc).all():
        raise RequestError(f"'{field}' contains NaN or infinite values; pixels must be integers 0..255")
    if hwc.min() < 0 or hwc.max() > 255:
        raise RequestError(f"'{field}' values range from {hwc.min():g} to {hwc.max():g}; pixels must be integers 0..255")
    if not np.array_equal(hwc, np.round(hwc)):
        raise RequestError(f"'{field}' contains fractional values; pixels must be integers 0..255")
    if channels == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    elif channels == 4:  # composite over white, as for encoded images with transparency
        alpha = hwc[..., 3:] / 255.0
        hwc = np.round(hwc[..., :3] * alpha + 255.0 * (1.0 - alpha))
    if layout.order == "BGR":
        hwc = hwc[..., ::-1]
    return np.ascontiguousarray(hwc, dtype=np.uint8)
