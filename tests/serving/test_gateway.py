"""End to end: the seeds' own HTTP APIs through `vision-attribution gateway`, in front of a real TorchServe (the
run's shared one: its tensormask, swin and deeplab archives, and this module's bit and lanet).

MAX Image Segmenter (the deeplab archive, its weights written by torchvision's own constructor in torchvision's
key layout) is held to MAX's own test expectations; the Flask seeds' curl lines from their READMEs run as
written, with only the host and port changed and no token, and get the replies a direct TorchServe call gets.
"""
import asyncio
import base64
import gzip
import io
import json
import quopri
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import torch
from PIL import Image
from skimage import data as photos

from gateway_harness import Gateway
from checkpoint_files import DEEPLAB_FILE_NAMES, deeplab_torchvision, png16, write_bit_checkpoint, write_lanet_checkpoint
from corpus import encoded, pixel_bomb_png, png_header_only
from replies import SEED_JSON, read_reply
from torchserve_harness import TorchServe, build_archive, free_port, jpeg_bytes, shipped_model_config
from vision_attribution.clients.cli import load_reply
from vision_attribution.clients.gateway.server import UploadLimit, max_app
from vision_attribution.clients.gateway.torchserve import InferenceKey, TorchServeClient

BIN = Path(sys.executable).parent
IGNORED = "X-Ignored-Fields"
SEED_CURL = 'curl http://localhost:8888/model/ --data @input_json_file.json --output saved_file.gzip -H "Content-Type:application/json; chartset=utf-8"'
"""The query line of the Flask seeds' READMEs (seeds 000-002), verbatim."""
UPLOAD_LIMIT_MB = 16
SEED_STEPS = 16
SEED_MODELS = {"bit": "bit_16_steps", "lanet": "lanet_16_steps", "tensormask": "tensormask", "swin": "swin"}
"""The TorchServe model behind each Flask seed's port (--seed SEED=PORT:MODEL): this module's bit and lanet archives
(SEED_STEPS path steps), the shared tensormask and swin archives."""


class Stack:
    def __init__(self, torchserve: TorchServe, gateway: Gateway, deeplab_checkpoint: Path):
        self.torchserve, self.gateway, self.deeplab_checkpoint = torchserve, gateway, deeplab_checkpoint


@pytest.fixture(scope="module")
def stack(shared_torchserve, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gateway")
    archives = {  # this module's archives: (archive, checkpoint, options)
        SEED_MODELS["bit"]: ("bit", write_bit_checkpoint(workdir / "bit.pth.tar"), []),
        SEED_MODELS["lanet"]: ("lanet", write_lanet_checkpoint(workdir / "top1.pt"), []),
    }

    def builder(name: str, archive: str, checkpoint: Path, options: list):
        config = shipped_model_config(archive)
        config.update(minWorkers=1, maxWorkers=1)
        if archive in ("bit", "lanet"):  # the seed's 50 steps, cut to keep the suite short on 2 cores
            config["attribution"]["n_steps"] = SEED_STEPS
        return lambda store: build_archive(archive, store, config, checkpoint, options, name=name, config_dir=workdir)

    shared_torchserve.serve("tensormask", "swin", "deeplab")  # swin: mmdet's test resize to 192x128, so that a CPU test stays fast
    deeplab_checkpoint = shared_torchserve.inputs("deeplab") / DEEPLAB_FILE_NAMES["mobile"]
    with shared_torchserve.private({name: builder(name, *recipe) for name, recipe in archives.items()}, __name__) as torchserve:
        seeds = {"bit": free_port(), "lanet": free_port(), "tensormask": free_port(), "swin": free_port()}
        gateway = Gateway(workdir, torchserve.inference, torchserve.workdir / "key_file.json", seeds, "--max-upload-mb", str(UPLOAD_LIMIT_MB), models=SEED_MODELS)
        try:
            yield Stack(torchserve, gateway, deeplab_checkpoint)
        finally:
            gateway.stop()


def photo_bytes(kind: str = "jpg") -> bytes:
    """scikit-image's coffee photo (600 x 400): MAX's predict answers at 513 x 342."""
    buffer = io.BytesIO()
    Image.fromarray(photos.coffee()).save(buffer, format={"jpg": "JPEG", "png": "PNG"}[kind])
    return buffer.getvalue()


def max_reference(image_bytes: bytes, checkpoint: Path, image_size: int = 513) -> tuple[list[int], torch.Tensor]:
    """What MAX computed, with these weights: open, convert to RGB, longest side to IMAGE_SIZE by MAX's arithmetic,
    LANCZOS; torchvision's DeepLabV3 on it; the class per pixel. Returns MAX's image_size [w, h] and seg_map."""
    image = Image.open(io.BytesIO(image_bytes))
    width, height = image.size
    resize_ratio = 1.0 * image_size / max(width, height)
    resized = image.convert("RGB").resize((int(resize_ratio * width), int(resize_ratio * height)), Image.LANCZOS)
    model = deeplab_torchvision("mobile", calibrate=False)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255
    normalised = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        return list(resized.size), model(normalised[None])["out"].argmax(dim=1)[0]


# MAX Image Segmenter's own tests (IBM/MAX-Image-Segmenter tests/test.py), against the gateway


def test_max_swagger(stack):
    reply = requests.get(f"{stack.gateway.url}/swagger.json", timeout=10)
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/json"
    spec = reply.json()
    assert "swagger" in spec and spec.get("info") and spec["info"]["title"] == "MAX Image Segmenter"


def test_max_metadata(stack):
    reply = requests.get(f"{stack.gateway.url}/model/metadata", timeout=10)
    assert reply.status_code == 200
    metadata = reply.json()
    assert metadata["id"] == "max-image-segmenter"
    assert metadata["name"] == "MAX Image Segmenter"
    assert metadata["description"] == "DeepLab TensorFlow model for semantic image segmentation, trained on VOCO 2012"
    assert metadata["license"] == "Apache v2"
    assert metadata["type"] == "Object Detection"
    assert "max-image-segmenter" in metadata["source"]


def test_max_labels(stack):
    reply = requests.get(f"{stack.gateway.url}/model/labels", timeout=10)
    assert reply.status_code == 200
    labels = reply.json()
    assert len(labels) == 21
    assert labels[3]["id"] == 3 and labels[3]["name"] == "bird"
    assert [label["name"] for label in labels][::5] == ["background", "bottle", "cow", "person", "tv"]


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_max_predict_real_photo(stack, kind):
    """MAX's test_predict: a JPEG and a PNG upload, status ok, image_size of the resized image, one seg_map row
    per pixel row; and the map is the one MAX's own resize + torchvision's model give with these weights."""
    image = photo_bytes(kind)
    reply = requests.post(f"{stack.gateway.url}/model/predict", files={"image": (f"coffee.{kind}", image, f"image/{kind}")}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    response = reply.json()
    assert set(response) == {"status", "image_size", "seg_map"} and response["status"] == "ok"
    assert response["image_size"] == [513, 342]
    assert len(response["seg_map"]) == response["image_size"][1] and {len(row) for row in response["seg_map"]} == {513}
    image_size, expected = max_reference(image, stack.deeplab_checkpoint)
    seg_map = torch.tensor(response["seg_map"])
    assert image_size == response["image_size"]
    assert len(seg_map.unique()) >= 3  # the random weights still tell regions apart
    assert (seg_map == expected).float().mean() > 0.999


def test_max_predict_not_an_image(stack):
    url = f"{stack.gateway.url}/model/predict"
    reply = requests.post(url, files={"image": ("test.py", Path(__file__).read_bytes(), "image/png")}, timeout=30)
    assert reply.status_code == 400
    assert reply.json()["message"] == "The provided input is not a valid image."
    reply = requests.post(url, files={"picture": ("coffee.jpg", photo_bytes(), "image/jpeg")}, timeout=30)
    assert reply.status_code == 400 and reply.json()["errors"] == {"image": "An image file (encoded as PNG or JPG/JPEG) Missing required parameter in an uploaded file"}
    reply = requests.post(url, data=photo_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert reply.status_code == 400 and "image" in reply.json()["errors"]


def test_max_predict_options_and_elongated_images(stack):
    """image_size is the archive's option, per request; other form fields MAX ignored are ignored and named (not
    refused as on the native route); an image 2000 x 3 keeps a 1-pixel side where MAX failed with 500."""
    url = f"{stack.gateway.url}/model/predict"
    reply = requests.post(url, files={"image": photo_bytes()}, data={"image_size": "64"}, timeout=60)
    assert reply.status_code == 200 and reply.json()["image_size"] == [64, 42] and IGNORED not in reply.headers
    reply = requests.post(url, files={"image": photo_bytes()}, data={"image_size": "4000"}, timeout=60)
    assert reply.status_code == 400 and "image_size" in reply.json()["error"]
    reply = requests.post(url, files={"image": photo_bytes()}, data={"MODEL_TYPE": "full"}, timeout=60)
    assert reply.status_code == 200 and reply.json()["image_size"] == [513, 342] and reply.headers[IGNORED] == "form:MODEL_TYPE"
    native = stack.torchserve.post("/predictions/deeplab", files={"image": photo_bytes()}, data={"MODEL_TYPE": "full"})
    assert native.status_code == 400 and "unknown field(s) ['MODEL_TYPE']" in native.json()["error"]
    strip = jpeg_bytes(np.full((3, 2000, 3), 200, np.uint8))
    reply = requests.post(url, files={"image": strip}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["image_size"] == [513, 1] and len(reply.json()["seg_map"]) == 1


# deeplab's native replies, straight from TorchServe


def multipart(parts: list[tuple[list[str], bytes]], boundary: str) -> bytes:
    """A multipart/form-data body written out by hand: each part's header lines, then its bytes."""
    body = b"".join(f"--{boundary}\r\n{''.join(line + chr(13) + chr(10) for line in lines)}\r\n".encode() + data + b"\r\n" for lines, data in parts)
    return body + f"--{boundary}--\r\n".encode()


def test_max_web_app_request(stack):
    """The exact request of IBM's MAX Image Segmenter Web App (a browser's FormData: the file in `image`, then the
    field `type` holding "undefined"): MAX's reply, `type` ignored as MAX ignored it, named in the header and the log."""
    boundary = "----WebKitFormBoundaryq3Vd5WzGx1RbM8Ls"
    body = multipart([(['Content-Disposition: form-data; name="image"; filename="coffee.jpg"', "Content-Type: image/jpeg"], photo_bytes()),
                      (['Content-Disposition: form-data; name="type"'], b"undefined")], boundary)  # fmt: skip
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "*/*", "Origin": "http://localhost:3000",
               "Referer": "http://localhost:3000/", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0.0.0 Safari/537.36"}  # fmt: skip
    reply = requests.post(f"{stack.gateway.url}/model/predict", data=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert set(reply.json()) == {"status", "image_size", "seg_map"} and reply.json()["image_size"] == [513, 342]
    assert reply.headers[IGNORED] == "form:type"
    assert "POST /model/predict: ignored what the seed's API ignores: form:type" in stack.gateway.log_path.read_text()


def test_max_predict_cleans_the_upload_and_refuses_what_is_ambiguous(stack):
    """TorchServe gets a form the gateway builds: a base64 part and bogus charsets give the plain upload's reply; a query
    string is ignored and named; two images are refused."""
    url = f"{stack.gateway.url}/model/predict"
    expected = requests.post(url, files={"image": photo_bytes()}, timeout=60).json()
    disposition = 'Content-Disposition: form-data; name="image"; filename="coffee.jpg"'
    cases = {
        "base64": ([disposition, "Content-Type: image/jpeg", "Content-Transfer-Encoding: base64"], base64.b64encode(photo_bytes()), ""),
        "part charset": ([disposition, "Content-Type: image/jpeg; charset=x-bogus"], photo_bytes(), ""),
        "form charset": ([disposition, "Content-Type: image/jpeg"], photo_bytes(), "; charset=x-bogus"),
    }
    for name, (lines, data, charset) in cases.items():
        reply = requests.post(url, data=multipart([(lines, data)], "b0undary"), headers={"Content-Type": f"multipart/form-data; boundary=b0undary{charset}"}, timeout=60)
        assert reply.status_code == 200 and reply.json() == expected, (name, reply.text)
    reply = requests.post(url, data=multipart([([disposition, "Content-Transfer-Encoding: x-uuencode"], photo_bytes())], "b0undary"),
                          headers={"Content-Type": "multipart/form-data; boundary=b0undary"}, timeout=60)  # fmt: skip
    assert reply.status_code == 400 and "Content-Transfer-Encoding 'x-uuencode'" in reply.json()["error"]
    reply = requests.post(f"{url}?image_size=16&image_size=32", files={"image": photo_bytes()}, timeout=60)
    assert reply.status_code == 200 and reply.json() == expected and reply.headers[IGNORED] == "query:image_size"
    reply = requests.post(url, files=[("image", photo_bytes()), ("image", photo_bytes("png"))], timeout=60)
    assert reply.status_code == 400 and reply.json() == {"error": "the form holds 2 'image' files; send one image per request"}
    reply = requests.post(url, files={"image": photo_bytes()}, data=[("image_size", "64"), ("image_size", "32")], timeout=60)
    assert reply.status_code == 400 and "'image_size' once" in reply.json()["error"]


def test_deeplab_native_prediction_and_png(stack):
    reply = stack.torchserve.post("/predictions/deeplab", data=photo_bytes())
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/gzip"
    result = read_reply(reply.content)
    masks = result["pred_masks"]
    assert masks.dtype == torch.bool and masks.shape[1:] == (400, 600) and len(masks) == len(result["labels"]) >= 1
    assert (masks.sum(dim=(1, 2))[:-1] >= masks.sum(dim=(1, 2))[1:]).all()  # largest first
    assert result["labels"] == [result["class_names"][c] for c in result["pred_classes"].tolist()] and "background" not in result["labels"]
    assert result["image_size"] == [513, 342] and result["seg_map"].shape == (342, 513)
    max_reply = stack.torchserve.post("/predictions/deeplab", data=photo_bytes(), headers={"Accept": "application/vnd.max-image-segmenter+json"})
    assert torch.equal(torch.tensor(max_reply.json()["seg_map"]), result["seg_map"].long())
    png = stack.torchserve.post("/predictions/deeplab", data=photo_bytes(), headers={"Accept": "image/png"})
    labels = np.asarray(Image.open(io.BytesIO(png.content)))
    assert labels.shape == (400, 600) and set(np.unique(labels)) - {0} == set(result["pred_classes"].tolist())


def test_deeplab_explanation_idg_per_predicted_class(stack):
    form = {"image": ("coffee.jpg", photo_bytes(), "image/jpeg")}
    reply = stack.torchserve.post("/explanations/deeplab", files=form, data={"n_steps": "4", "image_size": "48"})
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert result["integrated_grads"].shape == (1, 3, 32, 48) and result["seg_map"].shape == (32, 48)
    counts = torch.bincount(result["seg_map"].flatten().long(), minlength=21)
    largest = int(counts[1:].argmax()) + 1  # the foreground class with the largest region on the model input
    assert result["target"]["kind"] == "region" and result["target"]["name"] == result["class_names"][largest]
    idg = result["idg_per_mask"]
    assert idg["masks"].shape == (int((counts > 0).sum()), 32, 48)
    assert idg["labels"] == [result["class_names"][c] for c in torch.nonzero(counts).flatten().tolist()]
    assert float(idg["dividends"].sum()) == pytest.approx(1.0)
    gap = result["target_at_input"] - result["target_at_baseline"]
    assert result["convergence_delta"] == pytest.approx(gap - float(result["integrated_grads"].double().sum()), abs=1e-3)


# The Flask seeds' POST /model/


@pytest.mark.parametrize(
    "seed, prepare, api",
    [
        ("bit", ["cat", "input_json_file.json"], "explanations"),
        ("lanet", ["cat", "input_json_file.json"], "explanations"),
        ("tensormask", ["input_json_file.json", "--layout", "chw-bgr"], "predictions"),
        ("swin", ["input_json_file.json", "--layout", "hwc-bgr"], "predictions"),
    ],
)
def test_seed_curl_line_through_the_gateway(stack, tmp_path, seed, prepare, api):
    """The README's line, run as written with only the host and port changed and no token; the saved reply
    is what TorchServe itself answers the same body with its token, byte for byte but the gzip header's time."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(photos.chelsea(), (60, 40)))
    subprocess.run([str(BIN / "vision-attribution"), "prepare", str(photo), *prepare], cwd=tmp_path, check=True)  # as prepare_input.py
    command = SEED_CURL.replace("http://localhost:8888", stack.gateway.seed_url(seed))
    subprocess.run(command, shell=True, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    saved = (tmp_path / "saved_file.gzip").read_bytes()
    reply = load_reply(tmp_path / "saved_file.gzip")  # the project's reader (the seed README's gzip.open + torch.load)
    direct = stack.torchserve.post(f"/{api}/{SEED_MODELS[seed]}", data=(tmp_path / "input_json_file.json").read_bytes(), headers=SEED_JSON)
    assert direct.status_code == 200, direct.text
    assert gzip.decompress(saved) == gzip.decompress(direct.content)
    if api == "explanations":
        assert sorted(reply) == sorted(["integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output", "target_class"])
        assert reply["integrated_directional_grads"].shape == (SEED_STEPS, 3, 32, 32) and reply["target_class"] == 3
    else:
        assert reply["pred_masks"].dtype == torch.bool and reply["pred_masks"].shape[1:] == (40, 60)


def test_seed_errors_pass_through_with_their_status(stack):
    url = f"{stack.gateway.seed_url('bit')}/model/"
    for body in (json.dumps({"img_data": [[[0, 0, 0]]], "target_class": "unicorn"}), "{not json"):
        through = requests.post(url, data=body, headers=SEED_JSON, timeout=60)
        direct = stack.torchserve.post(f"/explanations/{SEED_MODELS['bit']}", data=body, headers=SEED_JSON)
        assert through.status_code == direct.status_code == 400
        assert through.json() == direct.json()
    assert "unknown class 'unicorn'" in requests.post(url, data=json.dumps({"img_data": [[[0, 0, 0]]], "target_class": "unicorn"}), timeout=60).json()["error"]
    assert requests.get(url, timeout=10).status_code == 405  # POST only, as the seed


def test_seed_json_in_the_encodings_flask_read(stack, tmp_path):
    """Flask's get_json read UTF-8 with a BOM, UTF-16 and UTF-32: the same reply as plain UTF-8. A gzip body (which
    Flask did not decompress) is refused naming Content-Encoding; a query string is ignored and named."""
    url = f"{stack.gateway.seed_url('bit')}/model/"
    document = json.dumps({"img_data": np.full((8, 8, 3), 128).tolist(), "target_class": 3})
    plain = requests.post(url, data=document.encode(), headers=SEED_JSON, timeout=120)
    assert plain.status_code == 200, plain.text
    for body in (b"\xef\xbb\xbf" + document.encode(), document.encode("utf-16"), document.encode("utf-16-le"), document.encode("utf-32")):
        reply = requests.post(url, data=body, headers=SEED_JSON, timeout=120)
        assert reply.status_code == 200 and gzip.decompress(reply.content) == gzip.decompress(plain.content), body[:4]
    reply = requests.post(url, data=gzip.compress(document.encode()), headers={**SEED_JSON, "Content-Encoding": "gzip"}, timeout=60)
    assert reply.status_code == 400 and "Content-Encoding 'gzip'" in reply.json()["error"]
    reply = requests.post(f"{url}?n_steps=4", data=document.encode(), headers=SEED_JSON, timeout=120)
    assert reply.status_code == 200 and reply.headers[IGNORED] == "query:n_steps"
    assert gzip.decompress(reply.content) == gzip.decompress(plain.content)


def test_upload_limit(stack, tmp_path):
    """Over the limit by Content-Length: 413 before the body is read (curl waits for it: Expect: 100-continue);
    streamed without a length: 413 once the limit is passed."""
    (tmp_path / "input_json_file.json").write_bytes(b"[" + b"0," * (UPLOAD_LIMIT_MB * 2**19) + b"0]")
    command = SEED_CURL.replace("http://localhost:8888", stack.gateway.seed_url("bit")).replace("--data", "--data-binary")
    subprocess.run(command, shell=True, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    reply = json.loads((tmp_path / "saved_file.gzip").read_text())
    assert reply == {"error": f"the upload is over this gateway's limit of {UPLOAD_LIMIT_MB * 2**20} bytes (--max-upload-mb)"}

    async def streamed_upload() -> httpx.Response:
        async def chunks():  # a well-formed form whose image part runs past the limit
            yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            for _ in range(8):
                yield b"x" * 1000
            yield b"\r\n--x--\r\n"

        client = TorchServeClient(stack.torchserve.inference, InferenceKey(stack.torchserve.workdir / "key_file.json", None), timeout=10)
        app = UploadLimit(max_app(client, "deeplab", cors=False), 5000)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            return await http.post("/model/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})

    reply = asyncio.run(streamed_upload())
    assert reply.status_code == 413 and "limit of 5000 bytes" in reply.json()["error"]


def test_a_client_gone_mid_upload_is_one_log_line(stack):
    """10 of 100000 declared body bytes, then the connection closes: one INFO line, no traceback; the next request
    is served."""
    log_before = len(stack.gateway.log_path.read_text())
    with socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10) as connection:
        connection.sendall(b"POST /model/predict HTTP/1.1\r\nHost: gateway\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
                           b"Content-Length: 100000\r\n\r\n--b0undary")  # fmt: skip
    deadline = time.time() + 10
    while "disconnected before its request was read" not in stack.gateway.log_path.read_text()[log_before:] and time.time() < deadline:
        time.sleep(0.1)
    logged = stack.gateway.log_path.read_text()[log_before:]
    assert "POST /model/predict: the client 127.0.0.1:" in logged and "Traceback" not in logged and "ERROR" not in logged, logged
    assert requests.get(f"{stack.gateway.url}/model/labels", timeout=10).status_code == 200


def test_cors_only_when_enabled(stack):
    headers = {"Origin": "http://example.org"}
    assert "access-control-allow-origin" not in requests.get(f"{stack.gateway.url}/model/labels", headers=headers, timeout=10).headers

    async def labels_with_cors() -> httpx.Response:
        client = TorchServeClient(stack.torchserve.inference, InferenceKey(stack.torchserve.workdir / "key_file.json", None), timeout=10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=max_app(client, "deeplab", cors=True)), base_url="http://gateway") as http:
            return await http.get("/model/labels", headers=headers)

    assert asyncio.run(labels_with_cors()).headers["access-control-allow-origin"] == "*"


# What TorchServe cannot answer: a renewed key, a refused key, no TorchServe, no reply in time


async def _predict_through(client: TorchServeClient) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=max_app(client, "deeplab", cors=False)), base_url="http://gateway") as http:
        try:
            return await http.post("/model/predict", files={"image": ("coffee.jpg", photo_bytes(), "image/jpeg")})
        finally:
            await client.close()


def wait_until_refused(torchserve: TorchServe, key: str, timeout: float = 60) -> None:
    """Poll TorchServe's inference API with `key` until it refuses the key (InvalidKeyException: it has expired);
    TorchServe writes its key file before its inference API listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = requests.post(f"{torchserve.inference}/predictions/deeplab", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            if reply.status_code == 400 and reply.json().get("type") == "InvalidKeyException":
                return
            answer = f"{reply.status_code} {reply.text}"
        except requests.ConnectionError as error:
            answer = repr(error)
        assert time.monotonic() < deadline, f"TorchServe still accepts the key after {timeout} s: {answer}"
        time.sleep(0.2)


def test_expiring_key_is_renewed_and_a_stopped_torchserve_is_503(tmp_path):
    """A TorchServe whose keys last 3 s (and which serves no model; its own server: token_expiration_min is
    server-wide): once TorchServe refuses the first inference key, the gateway renews it through the management API,
    so TorchServe's own 404 for the missing model comes through, not a refused token."""
    (tmp_path / "store").mkdir()
    with TorchServe(tmp_path, tmp_path / "store", [], extra_config={"token_expiration_min": "0.05"}) as torchserve:
        gateway = Gateway(tmp_path, torchserve.inference, tmp_path / "key_file.json", {}, "--management", torchserve.management)
        try:
            first_key = torchserve.keys["inference"]["key"]
            wait_until_refused(torchserve, first_key)  # the key has expired
            reply = requests.post(f"{gateway.url}/model/predict", files={"image": photo_bytes()}, timeout=60)
            assert reply.status_code == 404 and reply.json()["message"] == "Model not found: deeplab"
            assert json.loads((tmp_path / "key_file.json").read_text())["inference"]["key"] != first_key
            torchserve.stop()
            reply = requests.post(f"{gateway.url}/model/predict", files={"image": photo_bytes()}, timeout=60)
            assert reply.status_code == 503 and "is not reachable" in reply.json()["error"]  # the key's renewal or the request
        finally:
            gateway.stop()


def test_refused_key_no_key_and_no_torchserve_are_503_with_the_reason(stack, tmp_path):
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "wrong", "expiration time": "2999-01-01T00:00:00Z"}}))
    reply = asyncio.run(_predict_through(TorchServeClient(stack.torchserve.inference, InferenceKey(wrong, None), timeout=30)))
    assert reply.status_code == 503 and "TorchServe refused the gateway's inference key" in reply.json()["error"]
    closed = f"http://127.0.0.1:{free_port()}"
    reply = asyncio.run(_predict_through(TorchServeClient(closed, InferenceKey(wrong, None), timeout=30)))
    assert reply.status_code == 503 and f"TorchServe at {closed} is not reachable" in reply.json()["error"]
    reply = asyncio.run(_predict_through(TorchServeClient(stack.torchserve.inference, InferenceKey(tmp_path / "missing.json", None), timeout=30)))
    assert reply.status_code == 503 and "cannot read TorchServe's key file" in reply.json()["error"]


def test_no_reply_in_time_is_504(stack):
    async def silent_torchserve_and_gateway() -> httpx.Response:
        async def accept_and_say_nothing(reader, writer):
            await reader.read(1)
            await asyncio.sleep(5)

        server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            key = InferenceKey(stack.torchserve.workdir / "key_file.json", None)
            return await _predict_through(TorchServeClient(url, key, timeout=1))

    reply = asyncio.run(silent_torchserve_and_gateway())
    assert reply.status_code == 504 and "did not answer within 1 s" in reply.json()["error"]


# The API descriptions


@pytest.mark.parametrize("port_of", ["max", "bit"])
def test_api_description_matches_the_routes(stack, port_of, tmp_path):
    """schemathesis: the Swagger 2.0 document is valid, and generated requests get the statuses, content types
    and bodies it documents. Any file is a valid upload by the schema, but only images are answered 200, and the
    archives accept more pixel layouts (grey, RGBA) than the schema names: those two checks are left out."""
    url = stack.gateway.url if port_of == "max" else stack.gateway.seed_url(port_of)
    command = [
        str(BIN / "schemathesis"), "run", f"{url}/swagger.json", "--checks", "all",
        "--exclude-checks", "positive_data_acceptance,negative_data_rejection", "--max-examples", "10", "--max-response-time", "300",
        "--phases", "examples,coverage,fuzzing", "--request-timeout", "120", "--workers", "1", "--seed", "1", "--no-shrink",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_swagger_ui_assets_are_served_locally(stack):
    page = requests.get(f"{stack.gateway.url}/", timeout=10)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text and "http" not in page.text  # nothing from elsewhere
    for asset in ("swagger-ui/swagger-ui.css", "swagger-ui/swagger-ui-bundle.js"):
        reply = requests.get(f"{stack.gateway.url}/{asset}", timeout=10)
        assert reply.status_code == 200 and len(reply.content) > 10_000
    assert requests.get(f"{stack.gateway.url}/swagger-ui/index.html", timeout=10).status_code == 404


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_swagger_ui_renders_in_chromium(stack, tmp_path):
    """Headless Chromium with every host but this machine unresolvable renders the page: Swagger UI lists MAX's
    three operations, so its JavaScript and CSS came from the gateway."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=15000", "--window-size=1200,900",
    ]  # fmt: skip
    dom = subprocess.run(["chromium", *flags, "--dump-dom", f"{stack.gateway.url}/"], capture_output=True, text=True, timeout=120)
    for text in ("MAX Image Segmenter", 'data-path="/model/predict"', 'data-path="/model/metadata"', 'data-path="/model/labels"'):
        assert text in dom.stdout, dom.stdout[-3000:]
    screenshot = tmp_path / "swagger.png"
    subprocess.run(["chromium", *flags, f"--screenshot={screenshot}", f"{stack.gateway.url}/"], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape == (900, 1200) and pixels.std() > 10  # a rendered page, not a blank one


# Corpora: what careless and hostile clients send to MAX's routes and the seed ports ---------------------------------

SMALL_COFFEE = Image.fromarray(photos.coffee()).resize((96, 64))
SMALL_JPEG = jpeg_bytes(np.asarray(SMALL_COFFEE))
FAST = {"image_size": "64"}  # deeplab at 64 pixels: MAX's cases stay quick on 2 cores


def hand_written_form(*parts: tuple[list[str], bytes]) -> dict:
    """Request arguments: a multipart body written by hand (see multipart) and its Content-Type."""
    return {"data": multipart(list(parts), "corpus"), "headers": {"Content-Type": "multipart/form-data; boundary=corpus"}}


def image_part(data: bytes, *lines: str, content_type: str = "image/jpeg") -> tuple[list[str], bytes]:
    return ['Content-Disposition: form-data; name="image"; filename="coffee.jpg"', f"Content-Type: {content_type}", *lines], data


def field_part(name: str, value: str) -> tuple[list[str], bytes]:
    return [f'Content-Disposition: form-data; name="{name}"'], value.encode()


def gzipped(request: dict) -> dict:
    return {"data": gzip.compress(request["data"]), "headers": {**request["headers"], "Content-Encoding": "gzip"}}


def max_ok(ignored: str | None = None, size: list[int] | None = None):
    """MAX's 200 reply: status ok, seg_map rows; `ignored`: the X-Ignored-Fields header (None: absent)."""

    def check(reply: requests.Response) -> None:
        result = reply.json()
        assert result["status"] == "ok" and len(result["seg_map"]) == result["image_size"][1]
        if size is not None:
            assert result["image_size"] == size
        assert reply.headers.get(IGNORED) == ignored

    return check


class GatewayCase:
    """A request to the gateway's MAX port ("max") or a seed's port, and what must come back: the status, and
    `expect` in the JSON error's `error` or `message` (4xx), or a check of the 200 reply."""

    def __init__(self, port: str, status: int, expect, method: str, path: str, request: dict):
        self.port, self.status, self.expect, self.method, self.path, self.request = port, status, expect, method, path, request


def max_case(status: int, expect, method: str = "POST", path: str = "/model/predict", **request) -> GatewayCase:
    return GatewayCase("max", status, expect, method, path, request)


MAX_CORPUS = {
    "empty body": max_case(400, "Input payload validation failed", data=b""),
    "a JSON body": max_case(400, "Input payload validation failed", json={"image": "abc"}),
    "a form without image": max_case(400, "Input payload validation failed", files={"picture": SMALL_JPEG}),
    "image sent as a text field": max_case(400, "Input payload validation failed", data={"image": "coffee.jpg"}),
    "not an image": max_case(400, "The provided input is not a valid image.", files={"image": b"plain text"}),
    "an empty image file": max_case(400, "The provided input is not a valid image.", files={"image": b""}),
    "truncated jpeg": max_case(400, "truncated or corrupt", files={"image": SMALL_JPEG[:700]}),
    "two images": max_case(400, "2 'image' files", files=[("image", SMALL_JPEG), ("image", SMALL_JPEG)]),
    "image_size twice": max_case(400, "send the form field 'image_size' once", files={"image": SMALL_JPEG}, data=[("image_size", "64"), ("image_size", "96")]),
    "image_size as a file": max_case(400, "send the form field 'image_size' once, as text", files={"image": SMALL_JPEG, "image_size": b"64"}),
    "image_size under 16": max_case(400, "'image_size' must be between 16 and 1024", files={"image": SMALL_JPEG}, data={"image_size": "8"}),
    "image_size a word": max_case(400, "'image_size' must be an integer, got 'large'", files={"image": SMALL_JPEG}, data={"image_size": "large"}),
    "image_size of 400 digits": max_case(400, "'image_size' must be between 16 and 1024", files={"image": SMALL_JPEG}, data={"image_size": "9" * 400}),
    "pixel bomb png": max_case(413, "over the limit", files={"image": pixel_bomb_png()}),
    "png header announcing 64 megapixels": max_case(413, "over the limit of 36000000", files={"image": png_header_only(8000, 8000)}),
    "animated gif": max_case(400, "frames (an animation or a multi-page file)", files={"image": encoded(SMALL_COFFEE, "GIF", save_all=True, append_images=[SMALL_COFFEE.rotate(90)] * 2)}),
    "invalid base64 part": max_case(400, "not valid base64", **hand_written_form(image_part(b"abc", "Content-Transfer-Encoding: base64"))),
    "uuencoded part": max_case(400, "Content-Transfer-Encoding 'x-uuencode'", **hand_written_form(image_part(SMALL_JPEG, "Content-Transfer-Encoding: x-uuencode"))),
    "multipart without a boundary": max_case(400, "boundary", data=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data"}),
    "gzip-compressed form": max_case(400, "Content-Encoding 'gzip'", **gzipped(hand_written_form(image_part(SMALL_JPEG)))),
    "GET /model/predict": max_case(405, "Method Not Allowed", method="GET"),
    "PUT /model/predict": max_case(405, "Method Not Allowed", method="PUT", files={"image": SMALL_JPEG}),
    "POST /model/metadata": max_case(405, "Method Not Allowed", path="/model/metadata", data=b"{}"),
    "an unknown route": max_case(404, "Not Found", method="GET", path="/model/train"),
    "a Swagger UI file that is not there": max_case(404, "no such file: exploit.js", method="GET", path="/swagger-ui/exploit.js"),
    "a path out of the Swagger UI folder": max_case(404, "Not Found", method="GET", path="/swagger-ui/..%2F..%2Fserver.py"),
    "MAX's web app's type field": max_case(200, max_ok("form:type"), files={"image": SMALL_JPEG}, data={"type": "undefined", **FAST}),
    "a query string": max_case(200, max_ok("query:image_size, query:debug"), path="/model/predict?image_size=16&debug=1", files={"image": SMALL_JPEG}, data=FAST),
    "a field with a non-ASCII name": max_case(200, max_ok("form:légende"), files={"image": SMALL_JPEG}, data={"légende": "café", **FAST}),
    "base64 part": max_case(200, max_ok(size=[513, 342]), **hand_written_form(image_part(base64.b64encode(photo_bytes()), "Content-Transfer-Encoding: base64"))),
    "quoted-printable part": max_case(200, max_ok(), **hand_written_form(image_part(quopri.encodestring(SMALL_JPEG), "Content-Transfer-Encoding: quoted-printable"), field_part("image_size", "64"))),
    "a bogus charset on the part": max_case(200, max_ok(), **hand_written_form(image_part(SMALL_JPEG, content_type="image/jpeg; charset=x-bogus"), field_part("image_size", "64"))),
    "a JPEG labelled text/plain": max_case(200, max_ok(), files={"image": ("coffee.txt", SMALL_JPEG, "text/plain")}, data=FAST),
    "a file name with a path": max_case(200, max_ok(), files={"image": ("../../etc/passwd", SMALL_JPEG, "image/jpeg")}, data=FAST),
    "16-bit png": max_case(200, max_ok(size=[64, 42]), files={"image": png16(np.asarray(SMALL_COFFEE).astype(np.uint16) * 257)}, data=FAST),
    "one pixel": max_case(200, max_ok(size=[64, 64]), files={"image": encoded(Image.new("RGB", (1, 1)), "PNG")}, data=FAST),
    "an Accept header MAX never read": max_case(200, max_ok(), files={"image": SMALL_JPEG}, data=FAST, headers={"Accept": "text/html"}),
}

TENSORMASK_SEED = json.dumps({"img_data": np.asarray(SMALL_COFFEE)[:, :, ::-1].transpose(2, 0, 1).tolist()})
"""The tensormask seed's request: CHW BGR pixels (prepare_input.py --layout chw-bgr)."""


def seed_ok(ignored: str | None = None):
    def check(reply: requests.Response) -> None:
        assert read_reply(reply.content)["pred_masks"].shape[1:] == (64, 96)
        assert reply.headers.get(IGNORED) == ignored

    return check


def seed_case(port: str, status: int, expect, data: bytes | str = TENSORMASK_SEED, headers: dict = SEED_JSON, method: str = "POST", path: str = "/model/") -> GatewayCase:
    return GatewayCase(port, status, expect, method, path, {"data": data, "headers": headers})


def pixels(value: str) -> str:
    return '{"img_data": %s}' % value


SEED_CORPUS = {
    "invalid json": seed_case("tensormask", 400, "not valid JSON", "{not json"),
    "json list": seed_case("tensormask", 400, "must be an object, got list", "[1, 2, 3]"),
    "missing img_data": seed_case("tensormask", 400, "needs 'img_data'", '{"image_data": [[[0, 0, 0]]]}'),
    "empty body": seed_case("tensormask", 400, "empty", ""),
    "curl --data without a Content-Type": seed_case("tensormask", 400, "Content-Type is application/x-www-form-urlencoded", headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "ragged pixels": seed_case("tensormask", 400, "rectangular", pixels("[[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]")),
    "pixels over 255": seed_case("tensormask", 400, "0..255", pixels("[[[300]], [[0]], [[0]]]")),
    "NaN pixels": seed_case("tensormask", 400, "NaN", pixels("[[[NaN]], [[0]], [[0]]]")),
    "a pixel of 400 digits": seed_case("tensormask", 400, "0..255", pixels("[[[%s]], [[0]], [[0]]]" % ("9" * 400))),
    "a pixel of 1e400": seed_case("tensormask", 400, "infinite", pixels("[[[1e400]], [[0]], [[0]]]")),
    "strings as pixels": seed_case("tensormask", 400, "numbers", pixels('[[["a"]], [["b"]], [["c"]]]')),
    "nested too deeply": seed_case("tensormask", 400, "nested too deeply", '{"img_data": ' + "[" * 10_000),
    "two channels": seed_case("tensormask", 400, "2 channels", pixels(json.dumps(np.zeros((2, 8, 8), dtype=int).tolist()))),
    "gzip-compressed json": seed_case("tensormask", 400, "Content-Encoding 'gzip'", gzip.compress(TENSORMASK_SEED.encode()), {**SEED_JSON, "Content-Encoding": "gzip"}),
    "brotli-compressed json": seed_case("tensormask", 400, "Content-Encoding 'br'", TENSORMASK_SEED, {**SEED_JSON, "Content-Encoding": "br"}),
    "UTF-16 that is not JSON": seed_case("tensormask", 400, "its first bytes show UTF-16, but it is not valid JSON in UTF-16", "{not json}".encode("utf-16")),
    "latin-1 bytes in a string": seed_case("tensormask", 400, "not valid JSON", '{"img_data": [[[0]]], "note": "caf\xe9"}'.encode("latin-1")),
    "an Accept it cannot answer": seed_case("tensormask", 406, "cannot reply", headers={**SEED_JSON, "Accept": "text/html"}),
    "GET /model/": seed_case("tensormask", 405, "Method Not Allowed", method="GET"),
    "an unknown route": seed_case("tensormask", 404, "Not Found", path="/model/predict"),
    "bit: an unknown class": seed_case("bit", 400, "unknown class 'unicorn'", '{"img_data": [[[0, 0, 0]]], "target_class": "unicorn"}'),
    "bit: an unknown field": seed_case("bit", 400, "unknown field(s) ['colour']", '{"img_data": [[[0, 0, 0]]], "colour": "red"}'),
    "bit: a class index out of range": seed_case("bit", 400, "out of range", '{"img_data": [[[0, 0, 0]]], "target_class": 10}'),
    "lanet: n_steps zero": seed_case("lanet", 400, "'n_steps' must be between 1 and", '{"img_data": [[[0, 0, 0]]], "n_steps": 0}'),
    "lanet: a fractional pixel": seed_case("lanet", 400, "fractional", '{"img_data": [[[0.5, 0, 0]]]}'),
    "swin: two channels": seed_case("swin", 400, "2 channels", pixels(json.dumps(np.zeros((8, 8, 2), dtype=int).tolist()))),
    "swin: threshold over 1": seed_case("swin", 400, "'threshold' must be a number between 0 and 1", '{"img_data": [[[0, 0, 0]]], "threshold": 2}'),
    "a UTF-8 BOM": seed_case("tensormask", 200, seed_ok(), b"\xef\xbb\xbf" + TENSORMASK_SEED.encode()),
    "UTF-16 with a BOM": seed_case("tensormask", 200, seed_ok(), TENSORMASK_SEED.encode("utf-16")),
    "UTF-16 big-endian without a BOM": seed_case("tensormask", 200, seed_ok(), TENSORMASK_SEED.encode("utf-16-be")),
    "UTF-32": seed_case("tensormask", 200, seed_ok(), TENSORMASK_SEED.encode("utf-32")),
    "a query string": seed_case("tensormask", 200, seed_ok("query:threshold"), path="/model/?threshold=0.9"),
    "no Content-Type": seed_case("tensormask", 200, seed_ok(), headers={}),
    "a chunked body without a length": seed_case("tensormask", 200, seed_ok(), iter([TENSORMASK_SEED[:1000].encode(), TENSORMASK_SEED[1000:].encode()])),
    "Content-Encoding identity": seed_case("tensormask", 200, seed_ok(), headers={**SEED_JSON, "Content-Encoding": "identity"}),
}


def gateway_url(stack: Stack, port: str) -> str:
    return stack.gateway.url if port == "max" else stack.gateway.seed_url(port)


def assert_gateway_serves(stack: Stack, port: str) -> None:
    """The next request on that port is served: MAX's predict of a small photo, or the tensormask seed's request."""
    if port == "max":
        reply = requests.post(f"{stack.gateway.url}/model/predict", files={"image": SMALL_JPEG}, data=FAST, timeout=120)
        max_ok()(reply)
    else:
        seed_ok()(requests.post(f"{stack.gateway.seed_url('tensormask')}/model/", data=TENSORMASK_SEED, headers=SEED_JSON, timeout=120))


@pytest.mark.parametrize("name", [f"max: {name}" for name in MAX_CORPUS] + [f"seed: {name}" for name in SEED_CORPUS])
def test_bad_requests_to_the_gateway_get_a_clear_4xx_and_the_next_request_is_served(stack, name):
    kind, _, case_name = name.partition(": ")
    case = (MAX_CORPUS if kind == "max" else SEED_CORPUS)[case_name]
    reply = requests.request(case.method, gateway_url(stack, case.port) + case.path, timeout=120, **case.request)
    assert reply.status_code == case.status, reply.text[:500]
    if case.status == 200:
        case.expect(reply)
    else:
        assert reply.headers["content-type"].startswith("application/json"), reply.text[:300]
        error = reply.json()
        assert case.expect in str(error.get("error", error.get("message"))), error
    assert stack.gateway.process.poll() is None
    assert_gateway_serves(stack, "max" if kind == "max" else "seed")


def test_the_gateway_corpora_have_at_least_30_cases_each():
    assert len(MAX_CORPUS) >= 30 and len(SEED_CORPUS) >= 30
