"""End to end: the effnet, bit and lanet archives in a real TorchServe (the run's shared one), spoken to over HTTP."""
import base64
import io
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from skimage import data as photos

from replies import SEED_JSON, read_reply
from shared_torchserve import LANET_RESPONSE_LIMIT
from torchserve_harness import REPO, build_archive, jpeg_bytes, shipped_model_config
from vision_attribution.clients.cli import load_reply
from vision_attribution.networks.bit import ResNetV2
from vision_attribution.attribution.quadrature import path_coefficients

RESPONSE_LIMIT = LANET_RESPONSE_LIMIT  # lanet's attribution.max_response_bytes in the shared archive


def seed_request(array: np.ndarray, target_class: str) -> bytes:
    """What the seeds' prepare_input.py wrote: np.asarray(PIL image).tolist() plus the class name."""
    return json.dumps({"img_data": np.asarray(array).tolist(), "target_class": target_class}).encode()


@pytest.fixture(scope="module")
def server(shared_torchserve, tmp_path_factory):
    """The shared effnet and lanet archives, and this module's bit (BiT-R50x1, CIFAR-10, random weights)."""
    workdir = tmp_path_factory.mktemp("classifiers-bit")
    torch.manual_seed(0)
    bit_checkpoint = workdir / "bit_r50x1.pth"
    bit_state = ResNetV2((3, 4, 6, 3), 1, 10).state_dict()
    torch.save({f"module.{key}": value for key, value in bit_state.items()}, bit_checkpoint)
    config = shipped_model_config("bit")
    config["attribution"]["max_response_bytes"] = RESPONSE_LIMIT
    config.update(minWorkers=1, maxWorkers=2, batchSize=4, maxBatchDelay=300)
    shared_torchserve.serve("effnet", "lanet")
    with shared_torchserve.private({"bit": lambda store: build_archive("bit", store, config, bit_checkpoint, config_dir=workdir)}, __name__) as serving:
        yield serving


def test_effnet_predicts_real_photos(server):
    for photo, expected in ((photos.coffee(), "espresso"), (photos.chelsea(), "tiger cat")):
        reply = server.post("/predictions/effnet", data=jpeg_bytes(photo))
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        assert reply.json()["predicted_name"] == expected


def test_effnet_explanation_native_reply(server):
    form = {"image": ("coffee.jpg", jpeg_bytes(photos.coffee()), "image/jpeg")}
    reply = server.post("/explanations/effnet", files=form, data={"n_steps": "16", "target": "espresso"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/gzip"
    result = read_reply(reply.content)
    assert result["integrated_grads"].shape == (1, 3, 224, 224) and result["integrated_grads"].dtype == torch.float32
    assert result["step_sizes"].shape == (16, 1) and result["step_sizes"].dtype == torch.float64
    assert "integrated_directional_grads" not in result  # return_path is off by default for effnet
    assert result["target"]["name"] == "espresso" and result["target_class"] == 967
    logits_gap = result["target_at_input"] - result["target_at_baseline"]
    assert result["convergence_delta"] == pytest.approx(logits_gap - float(result["integrated_grads"].double().sum()), abs=1e-3)
    idg = result["idg_per_mask"]
    assert idg["idg"].shape == idg["dividends"].shape == (16,)
    assert idg["masks"].shape == (16, 224, 224) and len(idg["labels"]) == 16
    assert float(idg["dividends"].sum()) == pytest.approx(1.0)


def test_effnet_explains_from_an_uploaded_baseline_and_over_random_baselines(server):
    """A baseline image as a second multipart file; expected gradients over 3 uniform baselines, read as a .npz by
    np.load without pickle; the same seed gives the same reply."""
    coffee, chelsea = jpeg_bytes(photos.coffee()), jpeg_bytes(photos.chelsea())
    form = {"image": ("coffee.jpg", coffee, "image/jpeg"), "baseline_image": ("chelsea.jpg", chelsea, "image/jpeg")}
    reply = server.post("/explanations/effnet", files=form, data={"n_steps": "8", "target": "espresso"})
    assert reply.status_code == 200, reply.text
    from_cat = read_reply(reply.content)
    assert from_cat["attribution"] == {"method": "integrated_gradients", "baseline": "image"} and from_cat["baseline"] == "image"
    itself = read_reply(server.post("/explanations/effnet", files={**form, "baseline_image": ("coffee.jpg", coffee, "image/jpeg")}, data={"n_steps": "8"}).content)
    assert itself["target_at_baseline"] == pytest.approx(itself["target_at_input"]) and float(itself["integrated_grads"].abs().max()) == 0
    assert from_cat["target_at_baseline"] != pytest.approx(from_cat["target_at_input"])

    request = {"image": base64.b64encode(coffee).decode(), "baseline": "uniform", "baselines": 3, "n_steps": 8, "seed": 5}
    replies = [server.post("/explanations/effnet", json=request, headers={"Accept": "application/x-npz"}) for _ in range(2)]
    assert [reply.status_code for reply in replies] == [200, 200], replies[0].text
    assert replies[0].content == replies[1].content
    arrays = np.load(io.BytesIO(replies[0].content))
    assert arrays["integrated_grads"].shape == arrays["integrated_grads_std"].shape == (1, 3, 224, 224)
    assert arrays["paths/target_at_baseline"].shape == (3,) and str(arrays["attribution/method"]) == "expected_gradients"
    assert float(arrays["convergence_delta"]) == pytest.approx(float(arrays["paths/convergence_delta"].mean()))


def test_effnet_guided_ig_and_blur_ig_as_json_requests(server):
    """Guided IG and Blur IG by `attribution_method`, each reply telling how it was made and adding up to its own delta."""
    image = base64.b64encode(jpeg_bytes(photos.coffee())).decode()
    for options, described in (
        ({"attribution_method": "guided_ig", "n_steps": 12, "max_dist": 0.05}, {"method": "guided_ig", "baseline": "zeros", "fraction": 0.25, "max_dist": 0.05}),
        ({"attribution_method": "blur_ig", "n_steps": 8, "max_sigma": 20}, {"method": "blur_ig", "baseline": "blurred", "max_sigma": 20.0, "grad_step": 0.01}),
    ):  # fmt: skip
        reply = server.post("/explanations/effnet", json={"image": image, "target": "espresso", **options})
        assert reply.status_code == 200, reply.text
        document = read_reply(reply.content)
        assert document["attribution"] == described and document["n_steps"] == options["n_steps"]
        change = document["target_at_input"] - document["target_at_baseline"]
        assert document["convergence_delta"] == pytest.approx(change - float(document["integrated_grads"].double().sum()), abs=1e-3)


def test_the_readmes_expected_gradients_curl_line_as_written(server, tmp_path):
    """The README's line with only TorchServe's address changed, its token in $TOKEN as the README sets it."""
    (line,) = [line for line in (REPO / "README.md").read_text().splitlines() if "baselines=8" in line]
    command = line.split("`")[1].replace("http://127.0.0.1:8080", server.inference)
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes(photos.coffee()))
    subprocess.run(command, shell=True, cwd=tmp_path, check=True, timeout=600, env={**os.environ, "TOKEN": server.keys["inference"]["key"]})
    reply = load_reply(tmp_path / "eg.gz")
    assert reply["attribution"] == {"method": "expected_gradients", "baseline": "uniform", "baselines": 8, "seed": 0}
    assert reply["integrated_grads_std"].shape == (1, 3, 224, 224) and len(reply["paths"]) == 8 and reply["n_steps"] == 16


def test_npz_reply_by_accept_header(server):
    reply = server.post("/explanations/effnet", files={"image": jpeg_bytes(photos.chelsea())}, data={"n_steps": "4"}, headers={"Accept": "application/x-npz"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-npz"
    arrays = np.load(io.BytesIO(reply.content))
    assert arrays["integrated_grads"].shape == (1, 3, 224, 224)
    assert arrays["idg_per_mask/dividends"].shape == (16,)


@pytest.mark.parametrize("model", ["bit", "lanet"])
def test_seed_request_gets_the_exact_seed_reply(server, model):
    image = photos.chelsea()[::8, ::8]  # full-size H x W x 3 lists, as prepare_input.py sends them
    reply = server.post(f"/explanations/{model}", data=seed_request(image, "cat"), headers=SEED_JSON)
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert set(result) == {"integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output", "target_class"}
    assert result["integrated_grads"].shape == (1, 3, 32, 32)
    assert result["integrated_directional_grads"].shape == (50, 3, 32, 32) and result["integrated_directional_grads"].dtype == torch.float32
    assert result["intermediates"].shape == (50, 3, 32, 32) and result["intermediates"].dtype == torch.float32
    assert result["step_sizes"].shape == (50, 1) and result["step_sizes"].dtype == torch.float64
    assert result["output"].shape == (1, 10) and result["output"].dtype == torch.float32 and not result["output"].requires_grad
    assert result["target_class"] == 3
    # IG recomputed from the reply alone: the seed's baseline is 0, so x_k = alpha_k x, and IG = x * sum_k w_k g_k.
    alphas, weights = path_coefficients("gausslegendre", 50)
    assert torch.equal(result["step_sizes"][:, 0], weights)
    inputs = result["intermediates"].double() / alphas.view(-1, 1, 1, 1)
    assert torch.allclose(inputs, inputs[-1:].expand_as(inputs), atol=1e-4)
    weighted = (weights.view(-1, 1, 1, 1) * result["integrated_directional_grads"].double()).sum(0, keepdim=True)
    assert torch.allclose(inputs[-1:] * weighted, result["integrated_grads"].double(), rtol=1e-4, atol=1e-6)
    assert result["integrated_grads"].abs().sum() > 0


def test_seed_grey_and_rgba_images_are_converted(server):
    grey = np.asarray(Image.fromarray(photos.chelsea()).convert("L").resize((40, 30)))
    rgba = np.asarray(Image.fromarray(photos.chelsea()).convert("RGBA").resize((40, 30)))
    for image in (grey, rgba):
        reply = server.post("/explanations/lanet", data=seed_request(image, "dog"), headers=SEED_JSON)
        assert reply.status_code == 200, reply.text
        assert read_reply(reply.content)["target_class"] == 5


def test_mixed_batch_gets_each_its_own_kind_of_answer(server):
    body = seed_request(photos.coffee()[::10, ::10], "ship")

    def send(kind):
        return kind, server.post(f"/{kind}/lanet", data=body, headers=SEED_JSON)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, ["explanations", "predictions", "predictions", "explanations", "predictions", "explanations"]))
    for kind, reply in results:
        assert reply.status_code == 200, reply.text
        if kind == "predictions":
            assert reply.headers["content-type"] == "application/gzip"  # seed-format requests get gzip
            assert set(read_reply(reply.content)) >= {"output", "predicted_class"}
        else:
            assert read_reply(reply.content)["target_class"] == 8


def test_scaling_workers_through_the_management_api(server):
    reply = requests.put(f"{server.management}/models/lanet?min_worker=2&synchronous=true", headers=server.auth("management"), timeout=300)
    assert reply.status_code == 200, reply.text
    workers = server.workers("lanet")
    assert len(workers) == 2 and all(worker["status"] == "READY" for worker in workers)
    replies = [server.post("/predictions/lanet", data=jpeg_bytes(photos.coffee(), (64, 48))) for _ in range(4)]
    assert all(reply.status_code == 200 for reply in replies)
    reply = requests.put(f"{server.management}/models/lanet?min_worker=1&max_worker=1&synchronous=true", headers=server.auth("management"), timeout=300)
    assert reply.status_code == 200 and len(server.workers("lanet")) == 1


GOOD_IMAGE = photos.chelsea()[::8, ::8]


def test_a_seed_request_to_effnet_with_its_shipped_defaults_is_served(server):
    """effnet explains to tolerance 0.02 by default, with max_steps 257: 257 steps of seed path tensors (about 296 MiB)
    would not fit 100 MiB, so the default is lowered to what fits instead of failing the request with 413."""
    reply = server.post("/explanations/effnet", data=json.dumps({"img_data": photos.coffee()[::2, ::2].tolist()}).encode(), headers=SEED_JSON)
    assert reply.status_code == 200, reply.text
    seed = read_reply(reply.content)
    assert set(seed) == {"integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output", "target_class"}
    steps = seed["integrated_directional_grads"].shape[0]
    assert 21 <= steps < 257 and seed["integrated_directional_grads"].shape[1:] == (3, 224, 224) and len(reply.content) < 100 * 2**20


def test_oversize_seed_reply_is_refused_at_once_with_a_hint_a_seed_client_can_use(server):
    request = {"img_data": GOOD_IMAGE.tolist(), "target_class": "cat", "n_steps": 200}
    reply = server.post("/explanations/lanet", data=json.dumps(request).encode(), headers=SEED_JSON)
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert f"limit of {RESPONSE_LIMIT / 2**20:.1f} MiB" in error and '"return_path": false' in error
    fitting_steps = int(re.search(r"n_steps=(\d+) or fewer fits", error).group(1))
    assert server.workers_ready("lanet")
    fitting = server.post("/explanations/lanet", data=json.dumps({**request, "n_steps": fitting_steps}).encode(), headers=SEED_JSON)
    assert fitting.status_code == 200, fitting.text
    assert read_reply(fitting.content)["integrated_directional_grads"].shape == (fitting_steps, 3, 32, 32)
    without_path = server.post("/explanations/lanet", data=json.dumps({**request, "return_path": False}).encode(), headers=SEED_JSON)
    assert without_path.status_code == 200, without_path.text
    assert set(read_reply(without_path.content)) == {"integrated_grads", "step_sizes", "output", "target_class"}
