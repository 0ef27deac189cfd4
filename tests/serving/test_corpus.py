"""The bad-input corpus of the segmenters that test_reliability.py does not cover: deeplab (MAX Image Segmenter's
replacement), dextr (extreme points) and swin (mmdet), each served by the run's shared TorchServe (token auth,
one worker each; see shared_torchserve.SHARED_ARCHIVES).

Every case is one request as a careless or hostile client sends it; it gets its 4xx JSON error naming the problem
(valid images in unusual forms are served), the worker that answered is the same process afterwards, and the model
serves its probe request with the same answer as the first time.
"""
import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data as photos

from checkpoint_files import png16
from corpus import Case, check_reply, encoded, pixel_bomb_png, png_header_only
from replies import SEED_JSON, read_reply
from torchserve_harness import TorchServe

MODELS = ("deeplab", "dextr", "swin")
REQUEST_TIMEOUT = 300
COFFEE = Image.fromarray(photos.coffee()).resize((96, 64))
ASTRONAUT = Image.fromarray(photos.astronaut()).resize((96, 96))
POINTS = [[20, 10], [80, 40], [45, 5], [40, 90]]
"""Four extreme points [x, y] around the astronaut's face in the 96 x 96 photo."""
SMALL = {"image_size": "64"}
"""deeplab's model input at 64 pixels on the longest side: its cases stay quick on 2 cores."""


@pytest.fixture(scope="module")
def server(shared_torchserve) -> TorchServe:
    return shared_torchserve.serve(*MODELS)


def jpeg(image: Image.Image) -> bytes:
    return encoded(image.convert("RGB"), "JPEG", quality=92)


def as_json(**fields) -> bytes:
    return json.dumps(fields).encode()


def base64_of(image: Image.Image) -> str:
    return base64.b64encode(jpeg(image)).decode()


def dextr_form(image: bytes, **fields) -> dict:
    """Case arguments: a multipart form with `image` and the points (JSON text) unless given."""
    fields.setdefault("points", json.dumps(POINTS))
    return {"files": {"image": ("astronaut.jpg", image)}, "data": fields}


def dextr_json(accept: str | None = None, **fields) -> dict:
    """Case arguments: the seed's JSON request (base64 image, points, label) with `fields` changed (None drops one),
    and an Accept header if given."""
    document = {"image": base64_of(ASTRONAUT), "points": POINTS, "label": 1, **fields}
    headers = {**SEED_JSON, **({"Accept": accept} if accept else {})}
    return {"data": json.dumps({key: value for key, value in document.items() if value is not None}).encode(), "headers": headers}


def deeplab_form(image: bytes, **fields) -> dict:
    return {"files": {"image": ("coffee.jpg", image)}, "data": {**SMALL, **fields}}


def swin_form(image: bytes, **fields) -> dict:
    return {"files": {"image": ("coffee.jpg", image)}, "data": fields}


def has_mask_png(size: tuple[int, int]):
    def check(reply: requests.Response) -> None:
        assert reply.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(reply.content)).size == size

    return check


def has_masks_of(height: int, width: int):
    def check(reply: requests.Response) -> None:
        assert read_reply(reply.content)["pred_masks"].shape[1:] == (height, width)

    return check


def case(model: str, status: int, expect, kind: str = "predictions", **request) -> Case:
    return Case(model, status, expect, kind=kind, **request)


ELONGATED = encoded(Image.fromarray(photos.coffee()).resize((3000, 2)), "PNG")
ANIMATED = encoded(COFFEE, "GIF", save_all=True, append_images=[COFFEE.rotate(90), COFFEE.rotate(180)])

DEEPLAB = {
    "not an image": case("deeplab", 400, "not a valid image", data=b"plain text, not a picture"),
    "truncated jpeg": case("deeplab", 400, "truncated or corrupt", data=jpeg(COFFEE)[:800]),
    "empty body": case("deeplab", 400, "empty", data=b""),
    "empty image field": case("deeplab", 400, "empty", **deeplab_form(b"")),
    "pixel bomb png": case("deeplab", 413, "over the limit", data=pixel_bomb_png()),
    "png header announcing 64 megapixels": case("deeplab", 413, "over the limit of 36000000", data=png_header_only(8000, 8000)),
    "animated gif": case("deeplab", 400, "3 frames", **deeplab_form(ANIMATED)),
    "image_size under 16": case("deeplab", 400, "'image_size' must be between 16 and 1024", **deeplab_form(jpeg(COFFEE), image_size="15")),
    "image_size over 1024": case("deeplab", 400, "'image_size' must be between 16 and 1024", **deeplab_form(jpeg(COFFEE), image_size="1025")),
    "image_size a word": case("deeplab", 400, "'image_size' must be an integer, got 'big'", **deeplab_form(jpeg(COFFEE), image_size="big")),
    "image_size in exponent form": case("deeplab", 400, "'image_size' must be an integer, got '5e2'", **deeplab_form(jpeg(COFFEE), image_size="5e2")),
    "image_size of 400 digits": case("deeplab", 400, "'image_size' must be between 16 and 1024", **deeplab_form(jpeg(COFFEE), image_size="9" * 400)),
    "MAX's web app field on the native route": case("deeplab", 400, "unknown field(s) ['type']", **deeplab_form(jpeg(COFFEE), type="undefined")),
    "threshold of a binary segmenter": case("deeplab", 400, "unknown field(s) ['threshold']", **deeplab_form(jpeg(COFFEE), threshold="0.5")),
    "dextr's points": case("deeplab", 400, "unknown field(s) ['points']", **deeplab_form(jpeg(COFFEE), points=json.dumps(POINTS))),
    "explanation option in a prediction": case("deeplab", 400, "only apply to explanations", **deeplab_form(jpeg(COFFEE), n_steps="4")),
    "unknown class name": case("deeplab", 400, "unknown class 'spaceship'", "explanations", **deeplab_form(jpeg(COFFEE), target="spaceship")),
    "class index out of range": case("deeplab", 400, "out of range", "explanations", **deeplab_form(jpeg(COFFEE), target="21")),
    "negative class index": case("deeplab", 400, "out of range", "explanations", **deeplab_form(jpeg(COFFEE), target="-1")),
    "region_reduction median": case("deeplab", 400, "'region_reduction' must be one of sum, mean; got 'median'", "explanations", **deeplab_form(jpeg(COFFEE), region_reduction="median")),
    "n_steps zero": case("deeplab", 400, "'n_steps' must be between 1 and 1024", "explanations", **deeplab_form(jpeg(COFFEE), n_steps="0")),
    "n_steps over max_steps": case("deeplab", 400, "'n_steps' must be between 1 and 1024", "explanations", **deeplab_form(jpeg(COFFEE), n_steps="5000")),
    "method unknown": case("deeplab", 400, "'method' must be one of", "explanations", **deeplab_form(jpeg(COFFEE), method="simpson")),
    "baseline unknown": case("deeplab", 400, "'baseline' must be one of zeros, mean, black, white, blur, black_and_white, uniform, gaussian, image; got 'sepia'", "explanations", **deeplab_form(jpeg(COFFEE), baseline="sepia")),
    "one baseline as several": case("deeplab", 400, "baseline 'black' is one image", "explanations", **deeplab_form(jpeg(COFFEE), baseline="black", baselines="4")),
    "baselines over max_paths": case("deeplab", 400, "'baselines' must be between 1 and 64", "explanations", **deeplab_form(jpeg(COFFEE), baseline="uniform", baselines="65")),
    "baseline_sigma of zeros": case("deeplab", 400, "'baseline_sigma' is the sigma of a blur or gaussian baseline", "explanations", **deeplab_form(jpeg(COFFEE), baseline_sigma="3")),
    "seed without a draw": case("deeplab", 400, "'seed' seeds random baselines", "explanations", **deeplab_form(jpeg(COFFEE), seed="1")),
    "noise_samples with baselines": case("deeplab", 400, "not both", "explanations", **deeplab_form(jpeg(COFFEE), baseline="uniform", baselines="2", noise_samples="2")),
    "baseline_image not an image": case("deeplab", 400, "option 'baseline_image': the provided input is not a valid image", "explanations", files={"image": ("coffee.jpg", jpeg(COFFEE)), "baseline_image": ("b.jpg", b"not an image at all")}, data=SMALL),
    "guided ig with a tolerance and n_steps": case("deeplab", 400, "cannot be combined with 'n_steps'", "explanations", **deeplab_form(jpeg(COFFEE), attribution_method="guided_ig", tolerance="0.01", n_steps="8")),
    "guided ig option alone": case("deeplab", 400, "shape Guided IG's path", "explanations", **deeplab_form(jpeg(COFFEE), max_dist="0.1")),
    "several paths with return_path": case("deeplab", 400, "integrates 2 paths", "explanations", **deeplab_form(jpeg(COFFEE), noise_samples="2", return_path="true")),
    "tolerance zero": case("deeplab", 400, "'tolerance'", "explanations", **deeplab_form(jpeg(COFFEE), tolerance="0")),
    "tolerance infinite": case("deeplab", 400, "'tolerance'", "explanations", **deeplab_form(jpeg(COFFEE), tolerance="inf")),
    "max_steps one": case("deeplab", 400, "'max_steps' must be between", "explanations", **deeplab_form(jpeg(COFFEE), tolerance="0.1", max_steps="1")),
    "internal_batch_size zero": case("deeplab", 400, "'internal_batch_size' must be between 1 and", "explanations", **deeplab_form(jpeg(COFFEE), internal_batch_size="0")),
    "return_path not a boolean": case("deeplab", 400, "must be true or false", "explanations", **deeplab_form(jpeg(COFFEE), return_path="maybe")),
    "idg_hierarchy zero": case("deeplab", 400, "'idg_hierarchy' must be between 1 and 1000", "explanations", **deeplab_form(jpeg(COFFEE), idg_hierarchy="0")),
    "json list, not object": case("deeplab", 400, "must be an object, got list", data=b"[1, 2, 3]", headers={"Content-Type": "application/json"}),
    "json image not base64": case("deeplab", 400, "base64", data=as_json(image="not base64!!"), headers=SEED_JSON),
    "invalid json": case("deeplab", 400, "not valid JSON", data=b'{"image": "abc', headers=SEED_JSON),
    "unknown accept": case("deeplab", 406, "cannot reply", **deeplab_form(jpeg(COFFEE)), headers={"Accept": "text/html"}),
    "opex asked of a semantic segmenter": case("deeplab", 406, "cannot reply", **deeplab_form(jpeg(COFFEE)), headers={"Accept": "application/vnd.opex+json"}),
    "png asked of an explanation": case("deeplab", 406, "cannot reply", "explanations", **deeplab_form(jpeg(COFFEE)), headers={"Accept": "image/png"}),
    "16-bit rgb png": case("deeplab", 200, has_mask_png((96, 64)), **deeplab_form(png16(np.asarray(COFFEE).astype(np.uint16) * 257)), headers={"Accept": "image/png"}),
    "cmyk jpeg": case("deeplab", 200, has_mask_png((96, 64)), **deeplab_form(encoded(COFFEE.convert("CMYK"), "JPEG")), headers={"Accept": "image/png"}),
    "one pixel": case("deeplab", 200, has_mask_png((1, 1)), **deeplab_form(encoded(Image.new("RGB", (1, 1)), "PNG")), headers={"Accept": "image/png"}),
    "3000 x 2 strip": case("deeplab", 200, has_mask_png((3000, 2)), **deeplab_form(ELONGATED), headers={"Accept": "image/png"}),
}

DEXTR = {
    "no points": case("dextr", 400, "needs 'points'", **dextr_json(points=None)),
    "points not JSON in a form": case("dextr", 400, "'points'", **dextr_form(jpeg(ASTRONAUT), points="20,10 80,40")),
    "three points": case("dextr", 400, "four [x, y] points", **dextr_json(points=POINTS[:3])),
    "five points": case("dextr", 400, "four [x, y] points", **dextr_json(points=POINTS + [[1, 1]])),
    "points with three coordinates": case("dextr", 400, "four [x, y] points", **dextr_json(points=[[1, 2, 3]] * 4)),
    "points as an object": case("dextr", 400, "four [x, y] points", **dextr_json(points={"x": 1, "y": 2})),
    "points as strings": case("dextr", 400, "finite numbers only", **dextr_json(points=[["20", "10"]] * 4)),
    "points as booleans": case("dextr", 400, "finite numbers only", **dextr_json(points=[[True, False], [1, 2], [3, 4], [5, 6]])),
    "a NaN coordinate": case("dextr", 400, "finite numbers only", data=b'{"image": "%s", "points": [[NaN, 1], [2, 3], [4, 5], [6, 7]]}' % base64_of(ASTRONAUT).encode(), headers=SEED_JSON),
    "a coordinate of 400 digits": case("dextr", 400, "'points'", data=b'{"image": "%s", "points": [[%s, 1], [2, 3], [4, 5], [6, 7]]}' % (base64_of(ASTRONAUT).encode(), b"9" * 400), headers=SEED_JSON),
    "four equal points": case("dextr", 400, "four different points", **dextr_json(points=[[5, 5]] * 4)),
    "points on one vertical line": case("dextr", 400, "all have x = 20", **dextr_json(points=[[20, 1], [20, 30], [20, 50], [20, 90]])),
    "points far outside the image": case("dextr", 400, "far outside the 96x96 image", **dextr_json(points=[[20, 10], [800, 40], [45, 5], [40, 90]])),
    "negative points far outside": case("dextr", 400, "far outside the 96x96 image", **dextr_json(points=[[-500, 10], [80, 40], [45, 5], [40, 90]])),
    "label zero": case("dextr", 400, "'label' must be between 1 and 255", **dextr_json(label=0)),
    "label 256": case("dextr", 400, "'label' must be between 1 and 255", **dextr_json(label=256)),
    "label a word": case("dextr", 400, "'label' must be an integer", **dextr_json(label="person")),
    "threshold over 1": case("dextr", 400, "'threshold' must be a number between 0 and 1", **dextr_json(threshold=1.5)),
    "threshold NaN in a form": case("dextr", 400, "'threshold' must be a number between 0 and 1", **dextr_form(jpeg(ASTRONAUT), threshold="nan")),
    "a classifier's target in a prediction": case("dextr", 400, "unknown field(s) ['target']", **dextr_json(target=1)),
    "unknown field": case("dextr", 400, "unknown field(s) ['colour']", **dextr_json(colour="red")),
    "no image": case("dextr", 400, "needs 'img_data' (RGB pixels as H x W x C nested lists) or 'image'", **dextr_json(image=None)),
    "image not base64": case("dextr", 400, "base64", **dextr_json(image="%%%")),
    "image base64 of text": case("dextr", 400, "not a valid image", **dextr_json(image=base64.b64encode(b"not an image").decode())),
    "pixel bomb png": case("dextr", 413, "over the limit", **dextr_form(pixel_bomb_png())),
    "truncated jpeg": case("dextr", 400, "truncated or corrupt", **dextr_form(jpeg(ASTRONAUT)[:600])),
    "json list, not object": case("dextr", 400, "must be an object, got list", data=b"[[20, 10]]", headers=SEED_JSON),
    "json nested too deeply": case("dextr", 400, "nested too deeply", data=b'{"points": ' + b"[" * 10_000, headers=SEED_JSON),
    "n_steps in a prediction": case("dextr", 400, "only apply to explanations", **dextr_json(n_steps=4)),
    "n_steps over max_steps": case("dextr", 400, "'n_steps' must be between 1 and 256", "explanations", **dextr_json(n_steps=257)),
    "unknown accept": case("dextr", 406, "cannot reply", **dextr_json("text/csv")),
    "opex asked of an explanation": case("dextr", 406, "cannot reply", "explanations", **dextr_json("application/vnd.opex+json")),
    "one-pixel-high image": case("dextr", 200, has_mask_png((300, 1)), **dextr_form(encoded(Image.new("RGB", (300, 1)), "PNG"), points=json.dumps([[0, 0], [299, 0], [150, -1], [150, 1]])), headers={"Accept": "image/png"}),
    "palette png": case("dextr", 200, has_mask_png((96, 96)), **dextr_form(encoded(ASTRONAUT.quantize(64), "PNG")), headers={"Accept": "image/png"}),
    "points just outside an edge": case("dextr", 200, has_mask_png((96, 96)), **dextr_json("image/png", points=[[-5, 10], [100, 40], [45, -3], [40, 99]])),
}

SWIN = {
    "not an image": case("swin", 400, "not a valid image", data=b"plain text, not a picture"),
    "truncated jpeg": case("swin", 400, "truncated or corrupt", **swin_form(jpeg(COFFEE)[:700])),
    "empty body": case("swin", 400, "empty", data=b""),
    "empty image field": case("swin", 400, "empty", **swin_form(b"")),
    "image in a wrongly named form field": case("swin", 400, "only the field(s) ['file']", files={"file": jpeg(COFFEE)}),
    "pixel bomb png": case("swin", 413, "over the limit", data=pixel_bomb_png()),
    "png header announcing 10^10 pixels": case("swin", 413, "over the decoder's pixel limit", data=png_header_only(100_000, 100_000)),
    "animated gif": case("swin", 400, "3 frames", **swin_form(ANIMATED)),
    "multi-page tiff": case("swin", 400, "2 frames", **swin_form(encoded(COFFEE, "TIFF", save_all=True, append_images=[COFFEE.rotate(90)]))),
    "float tiff outside [0, 1]": case("swin", 400, "[0, 1]", **swin_form(encoded(Image.fromarray(np.asarray(COFFEE.convert("L")).astype(np.float32)), "TIFF"))),
    "threshold over 1": case("swin", 400, "'threshold' must be a number between 0 and 1", **swin_form(jpeg(COFFEE), threshold="2")),
    "threshold negative": case("swin", 400, "'threshold' must be a number between 0 and 1", **swin_form(jpeg(COFFEE), threshold="-0.1")),
    "threshold a word": case("swin", 400, "'threshold' must be a number between 0 and 1", **swin_form(jpeg(COFFEE), threshold="high")),
    "native_resolution not a boolean": case("swin", 400, "must be true or false", **swin_form(jpeg(COFFEE), native_resolution="yes please")),
    "instance negative": case("swin", 400, "'instance' must be at least 0, got -1", "explanations", **swin_form(jpeg(COFFEE), instance="-1")),
    "instance a word": case("swin", 400, "'instance' must be an integer, got 'first'", "explanations", **swin_form(jpeg(COFFEE), instance="first")),
    "instance in a prediction": case("swin", 400, "only apply to explanations", **swin_form(jpeg(COFFEE), instance="0")),
    "a classifier's target": case("swin", 400, "unknown field(s) ['target']", **swin_form(jpeg(COFFEE), target="cat")),
    "deeplab's image_size": case("swin", 400, "unknown field(s) ['image_size']", **swin_form(jpeg(COFFEE), image_size="64")),
    "n_steps zero": case("swin", 400, "'n_steps' must be between 1 and 128", "explanations", **swin_form(jpeg(COFFEE), n_steps="0")),
    "n_steps over max_steps": case("swin", 400, "'n_steps' must be between 1 and 128", "explanations", **swin_form(jpeg(COFFEE), n_steps="129")),
    "internal_batch_size over its limit": case("swin", 400, "'internal_batch_size' must be between 1 and 4", "explanations", **swin_form(jpeg(COFFEE), internal_batch_size="5")),
    "method unknown": case("swin", 400, "'method' must be one of", "explanations", **swin_form(jpeg(COFFEE), method="euler")),
    "tolerance over 1": case("swin", 400, "'tolerance'", "explanations", **swin_form(jpeg(COFFEE), tolerance="1.5")),
    "return_path not a boolean": case("swin", 400, "must be true or false", "explanations", **swin_form(jpeg(COFFEE), return_path="2")),
    "no detection above the threshold": case("swin", 422, "no instance was detected with a score above 1", "explanations", **swin_form(jpeg(COFFEE), threshold="1")),
    "invalid seed json": case("swin", 400, "not valid JSON", data=b'{"img_data": [[[1, 2', headers=SEED_JSON),
    "seed json with two channels": case("swin", 400, "2 channels", data=as_json(img_data=[[[1, 2]] * 4] * 4), headers=SEED_JSON),
    "seed json values over 255": case("swin", 400, "0..255", data=as_json(img_data=[[[300, 0, 0]] * 4] * 4), headers=SEED_JSON),
    "unknown accept": case("swin", 406, "cannot reply", **swin_form(jpeg(COFFEE)), headers={"Accept": "application/xml"}),
    "opex asked of an instance segmenter": case("swin", 406, "cannot reply", **swin_form(jpeg(COFFEE)), headers={"Accept": "application/vnd.opex+json"}),
    "rgba png": case("swin", 200, has_masks_of(64, 96), **swin_form(encoded(COFFEE.convert("RGBA"), "PNG")), headers={"Accept": "application/gzip"}),
    "grey jpeg": case("swin", 200, has_masks_of(64, 96), **swin_form(jpeg(COFFEE.convert("L"))), headers={"Accept": "application/gzip"}),
}

CORPUS = {f"{model}: {name}": item for model, cases in (("deeplab", DEEPLAB), ("dextr", DEXTR), ("swin", SWIN)) for name, item in cases.items()}


def probe(server: TorchServe, model: str) -> np.ndarray:
    """A normal prediction of `model`; the numbers of its reply that must not change between probes."""
    if model == "deeplab":
        reply = server.post("/predictions/deeplab", files={"image": jpeg(COFFEE)}, data=SMALL, headers={"Accept": "image/png"}, timeout=REQUEST_TIMEOUT)
        assert reply.status_code == 200, reply.text
        return np.asarray(Image.open(io.BytesIO(reply.content)))
    if model == "dextr":
        reply = server.post("/predictions/dextr", **dextr_json(), timeout=REQUEST_TIMEOUT)
        assert reply.status_code == 200, reply.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.json()["mask"]))))
    reply = server.post("/predictions/swin", files={"image": jpeg(COFFEE)}, headers={"Accept": "application/gzip"}, timeout=REQUEST_TIMEOUT)
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    return np.concatenate([result["scores"].numpy(), result["pred_masks"].float().sum(dim=(1, 2)).numpy()])


FIRST_PROBES: dict[str, np.ndarray] = {}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_gets_a_clear_4xx_from_the_same_worker_and_the_next_request_is_served(server, name):
    case_ = CORPUS[name]
    workers_before = server.worker_pids(case_.model)
    reply = server.post(f"/{case_.kind}/{case_.model}", data=case_.data, files=case_.files, headers=case_.headers, timeout=REQUEST_TIMEOUT)
    check_reply(case_, reply)
    assert server.worker_pids(case_.model) == workers_before and server.workers_ready(case_.model)
    answer = probe(server, case_.model)
    np.testing.assert_allclose(answer, FIRST_PROBES.setdefault(case_.model, answer), rtol=1e-4, atol=1e-4)


def test_each_archive_has_at_least_30_cases():
    assert all(len(cases) >= 30 for cases in (DEEPLAB, DEXTR, SWIN))
