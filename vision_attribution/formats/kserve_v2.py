"""KServe v2 (Open Inference Protocol) requests and replies, as TorchServe 0.12's `kservev2` service envelope
hands them to the handler and takes them back; docs/formats.md ("KServe v2 (Open Inference Protocol)") documents this format.

Request (POST /v2/models/{model}/infer for a prediction, /v2/models/{model}/explain for an explanation):
  {"id": "...", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64 image file>"],
                            "parameters": {"n_steps": 16}},
                           {"name": "target", "datatype": "BYTES", "shape": [1], "data": ["espresso"]}]}
  * the input named "image" carries the picture, either as BYTES (one base64-encoded image file: JPEG, PNG,
    ..., or a data: URL) or as a tensor of integer pixel values 0..255, channel-last RGB: [H, W, 3] or
    [1, H, W, 3]; [H, W] grey and [H, W, 4] RGBA are converted.
  * options (the same names and values as a native request) are the image input's "parameters", or inputs
    of their own named like the option (one element, or a nested list for an option that takes one).
The envelope hands the handler the inputs only: a BYTES input arrives as its first element, a tensor
reshaped to its "shape" as nested lists; the request's top-level "parameters" never reach the handler.

Reply: one output per key of the native reply (named as in the .npz reply: "outer/inner" for nested keys,
"list/field" for records), its datatype from the values' dtype (FP32, FP64, INT64, BOOL, BYTES for text).
The envelope flattens every output to one dimension, so an output whose tensor has two or more dimensions
is followed by "NAME.shape" (INT64) holding its real shape: np.reshape(data, that) restores it.
"""
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .decode import PixelLayout, decode_base64_image, decode_pixel_lists
from .encode import flatten_reply
from .errors import RequestError
from .requests import ParsedRequest, parse_options
from .values import Check

IMAGE_INPUT = "image"
IMAGE_TENSOR_LAYOUT = PixelLayout("HWC", "RGB", grey_and_alpha=True)
SHAPE_SUFFIX = ".shape"
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.str_,
}
INTEGER_DATATYPES = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
BATCH_OF_ONE = (
    "TorchServe's kservev2 envelope hands the handler only the first request of a batch; "
    "serve this model with batchSize 1 when service_envelope=kservev2 is set"
)


def from_envelope(context) -> bool:
    """True when TorchServe's kservev2 envelope parsed this batch: it records the input names on the context."""
    return getattr(context, "input_names", None) is not None


def parse_inputs(inputs: list, checks: Mapping[str, Check], max_pixels: int) -> ParsedRequest:
    """The envelope's inputs ([{"name", "datatype", "shape", "data", "parameters"?}, ...]) -> the image as
    (H, W, 3) uint8 RGB and the options, validated by `checks`."""
    if not isinstance(inputs, list) or not all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in inputs):
        raise RequestError("a KServe v2 request needs 'inputs': a list of tensors, each with a 'name'")
    by_name: dict[str, dict] = {}
    for item in inputs:
        if item["name"] in by_name:
            raise RequestError(f"the KServe v2 input {item['name']!r} is given twice")
        by_name[item["name"]] = item
    image_input = by_name.pop(IMAGE_INPUT, None)
    if image_input is None:
        raise RequestError(f"a KServe v2 request needs an input named {IMAGE_INPUT!r} (BYTES: a base64 image file; or UINT8 [H, W, 3] RGB); got {sorted(by_name)}")
    image = _decode_image(image_input, max_pixels)
    raw_options = dict(image_input.get("parameters") or {})
    for name, item in by_name.items():
        if name in raw_options:
            raise RequestError(f"option {name!r} is given both as an input and in the image input's parameters")
        raw_options[name] = _option_value(item)
    return ParsedRequest(image=image, seed_format=False, options=parse_options(raw_options, checks))


def _decode_image(item: dict, max_pixels: int) -> np.ndarray:
    datatype, data = item.get("datatype"), item.get("data")
    if datatype == "BYTES":
        return decode_base64_image(data, max_pixels)
    if datatype not in INTEGER_DATATYPES:
        raise RequestError(
            f"the {IMAGE_INPUT!r} input has datatype {datatype!r}; send BYTES (a base64 image file) or an integer tensor "
            f"(UINT8) of pixel values 0..255 shaped [H, W, 3] or [1, H, W, 3], RGB"
        )
    shape = item.get("shape")
    if isinstance(shape, list) and len(shape) == 4:
        if shape[0] != 1:
            raise RequestError(f"the {IMAGE_INPUT!r} input has shape {shape}: send one image per request ([1, H, W, 3])")
        data = data[0] if isinstance(data, list) and data else data
    return decode_pixel_lists(data, IMAGE_TENSOR_LAYOUT, max_pixels, field=IMAGE_INPUT)


def _option_value(item: dict) -> Any:
    """An option sent as an input: BYTES arrive as their first element; one-element tensors as that element."""
    data = item.get("data")
    if item.get("datatype") == "BYTES":
        return data
    values = np.asarray(data)
    return values.reshape(-1)[0].item() if values.size == 1 else data


def _datatype(array: np.ndarray) -> str:
    if array.dtype.kind == "U":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"no KServe v2 datatype for {array.dtype}")


@dataclass(frozen=True)
class Output:
    """One v2 output as the envelope takes it: its name and its values, flat (n,), the datatype named after the
    dtype (_datatype)."""

    name: str
    data: np.ndarray


def outputs_of(payload: dict) -> list[Output]:
    """The reply dict -> its v2 outputs, exactly as the envelope will write them: flat data, and a "NAME.shape"
    output (INT64) after each output of 2+ dimensions."""
    outputs = []
    for name, array in flatten_reply(payload).items():
        outputs.append(Output(name, array.reshape(-1)))
        if array.ndim >= 2:
            outputs.append(Output(name + SHAPE_SUFFIX, np.asarray(array.shape, dtype=np.int64)))
    return outputs


def reply_document(outputs: list[Output]) -> dict:
    """{"outputs": [{"name", "datatype", "shape", "data"}, ...]}: the reply as the envelope writes it, less the
    request's id, the model's name and its version."""
    return {"outputs": [
        {"name": output.name, "datatype": _datatype(output.data), "shape": [int(output.data.size)], "data": output.data.tolist()}
        for output in outputs
    ]}  # fmt: skip


_MOST_BYTES_PER_VALUE = {"b": 16, "U": 12}  # a value on its own line of indent=2 JSON, at most: false; quotes and indent
_MOST_BYTES_PER_CHARACTER = 6  # \uXXXX
_MOST_BYTES_PER_NUMBER = 36  # indent, the longest float repr (-1.2345678901234567e-308), a comma and a newline


def reply_bytes_over(outputs: list[Output], limit: int) -> int | None:
    """The size of the reply as JSON (indent=2, as TorchServe sends it) when it is over `limit` bytes, else None.
    Serialises only when a bound on the size (from the values' count and kind) is over the limit."""
    bound = 0
    for output in outputs:
        data = output.data
        if data.dtype.kind == "U":
            bound += data.size * _MOST_BYTES_PER_VALUE["U"] + sum(map(len, data.tolist())) * _MOST_BYTES_PER_CHARACTER
        else:
            bound += data.size * _MOST_BYTES_PER_VALUE.get(data.dtype.kind, _MOST_BYTES_PER_NUMBER)
        bound += 200 + len(output.name) * _MOST_BYTES_PER_CHARACTER
    if bound <= limit:
        return None
    size = len(json.dumps(reply_document(outputs), indent=2).encode("utf-8"))
    return size if size > limit else None
