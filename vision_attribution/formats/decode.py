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
    """Decode an encoded image (JPEG, PNG, TIFF, WebP, ...) to (H, W, 3) uint8 RGB.

    The size is checked from the header before any pixel is decoded. EXIF orientation is applied; grey,
    palette and CMYK images are converted; transparency is composited over white; high bit depths are
    scaled to 8 bits (to_8_bit). Multi-frame images (animations, multi-page files) are refused.
    """
    if not data:
        raise RequestError("the request body is empty; send an image or a JSON request")
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixel_count(image.width, image.height, max_pixels)
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise RequestError(f"the image has {frames} frames (an animation or a multi-page file); send a single image")
            image.load()
            image = to_8_bit(ImageOps.exif_transpose(image))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except Image.DecompressionBombError as error:
        raise RequestError(f"the image is over the decoder's pixel limit ({error}); send a smaller image", status=413) from error
    except UnidentifiedImageError as error:
        raise RequestError(
            f"the provided input is not a valid image: no image format (JPEG, PNG, TIFF, WebP, ...) recognises its first "
            f"bytes {data[:16]!r}"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise RequestError(f"the image could not be decoded, it may be truncated or corrupt ({error})") from error


def to_8_bit(image: Image.Image) -> Image.Image:
    """Scale images of more than 8 bits per sample to 8 bits instead of letting Pillow clip them at 255.

    16-bit integers (mode I;16*, e.g. 16-bit grey PNG and TIFF) are divided by 65535/255; 32-bit integers
    (mode I) by (2**31 - 1)/255, negatives as 0; 32-bit floats (mode F) are read as intensities in [0, 1] and
    refused outside it. 16-bit RGB(A) PNGs arrive as 8-bit RGB(A) from Pillow already (their high bytes).
    """
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    elif image.mode == "I":
        full_scale = 2.0**31 - 1
    elif image.mode == "F":
        full_scale = 1.0
    else:
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
        raise RequestError(f"a floating-point image must hold intensities in [0, 1]; this one ranges from {np.nanmin(values):g} to {np.nanmax(values):g}")
    return Image.fromarray(np.round(np.clip(values, 0, full_scale) * (255.0 / full_scale)).astype(np.uint8), mode="L")


def decode_base64_image(text: str, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "image") -> np.ndarray:
    """Decode a base64 string (optionally a data: URL) holding an encoded image to (H, W, 3) uint8 RGB; `field`
    names it in errors."""
    if not isinstance(text, str):
        raise RequestError(f"'{field}' must be a base64-encoded image string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"'{field}' is not valid base64 ({error})") from error
    return decode_image_bytes(data, max_pixels)


def decode_pixel_lists(values, layout: PixelLayout, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "img_data") -> np.ndarray:
    """Turn nested lists of integer pixel values 0..255 in `layout` into (H, W, 3) uint8 RGB."""
    if not isinstance(values, list) or not values:
        raise RequestError(f"'{field}' must be a non-empty nested list of {layout.describe()}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise RequestError(f"'{field}' must be a rectangular nested list of numbers ({layout.describe()}): {error}") from error
    except OverflowError:
        raise RequestError(f"'{field}' holds an integer too large for any number type; pixels must be integers 0..255") from None
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
