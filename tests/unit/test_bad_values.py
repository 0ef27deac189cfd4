"""Values no client should send, refused by name instead of failing the worker: numbers too large for a float
(400 digits of JSON) in options and in a seed's pixel lists, and images with a side of one pixel for DEXTR's
contours."""
import numpy as np
import pytest

from vision_attribution.adapters.interactive import mask_contours
from vision_attribution.formats import values
from vision_attribution.formats.decode import PixelLayout, decode_pixel_lists
from vision_attribution.formats.errors import RequestError
from vision_attribution.formats.requests import parse_options

HUGE = int("9" * 400)


@pytest.mark.parametrize(
    "name, check, value, message",
    [
        ("threshold", values.number(0.0, 1.0), HUGE, "must be a number between 0 and 1, got an integer of 400 digits"),
        ("tolerance", values.number(1e-6, 1.0), "9" * 400, "must be a number between 1e-06 and 1"),
        ("n_steps", values.integer(1, 1024), HUGE, "must be between 1 and 1024, got an integer of 400 digits"),
        ("n_steps", values.integer(1, 1024), "9" * 5000, "must be an integer"),
        ("points", values.extreme_points, [[HUGE, 1], [2, 3], [4, 5], [6, 7]], "must hold finite numbers only"),
    ],
)
def test_a_number_too_large_for_a_float_is_a_400_naming_the_option(name, check, value, message):
    with pytest.raises(RequestError, match=f"option '{name}' {message}") as caught:
        parse_options({name: value}, {name: check})
    assert caught.value.status == 400 and len(caught.value.message) < 300


@pytest.mark.parametrize("layout", [PixelLayout("HWC", "RGB"), PixelLayout("CHW", "BGR")])
def test_a_pixel_too_large_for_a_float_is_a_400(layout):
    """Found by the gateway's seed corpus: it was a 500 (OverflowError from numpy)."""
    with pytest.raises(RequestError, match="'img_data' holds an integer too large for any number type") as caught:
        decode_pixel_lists([[[HUGE, 0, 0]]] if layout.axes == "HWC" else [[[HUGE]], [[0]], [[0]]], layout)
    assert caught.value.status == 400


@pytest.mark.parametrize("shape", [(1, 1), (300, 1), (1, 20000), (2, 1)])
def test_a_one_pixel_side_has_no_contour_rather_than_an_error(shape):
    assert mask_contours(np.ones(shape), 0.5) == []


def test_contours_of_a_two_pixel_image_are_still_found():
    probability = np.zeros((4, 4))
    probability[1:3, 1:3] = 1.0
    assert mask_contours(probability, 0.5) != []
