"""The photo set of bench/tolerance.py: photos that ship with the installed packages, each as PNG and as JPEG at
three qualities, at full size and resized to half its sides, encoded here as a client would upload them.

    photo_set() -> [PhotoCase(photo, encoding, size, data)], 4 photos x 4 encodings x 2 sizes = 32 cases
"""
import io
from dataclasses import dataclass

import matplotlib.cbook
import numpy as np
from PIL import Image
from skimage import data as photos

ENCODINGS = ("png", "jpeg95", "jpeg90", "jpeg75")
SIZES = {"full": 1.0, "half": 0.5}


def grace_hopper() -> np.ndarray:
    """matplotlib's sample photo (600 x 512), (H, W, 3) uint8."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        return np.asarray(image.convert("RGB"))


PHOTOS = {"coffee": photos.coffee, "astronaut": photos.astronaut, "chelsea": photos.chelsea, "grace_hopper": grace_hopper}


@dataclass(frozen=True)
class PhotoCase:
    photo: str
    encoding: str
    size: str
    data: bytes  # the encoded file

    @property
    def label(self) -> str:
        return f"{self.photo} {self.encoding} {self.size}"


def encoded(pixels: np.ndarray, encoding: str, scale: float) -> bytes:
    """(H, W, 3) uint8 resized by `scale` (Lanczos), then saved as PNG or as JPEG at the quality in its name."""
    image = Image.fromarray(pixels)
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=int(encoding.removeprefix("jpeg")))
    return buffer.getvalue()


def photo_set(names=tuple(PHOTOS), encodings=ENCODINGS, sizes=tuple(SIZES)) -> list[PhotoCase]:
    return [PhotoCase(name, encoding, size, encoded(PHOTOS[name](), encoding, SIZES[size])) for name in names for size in sizes for encoding in encodings]
