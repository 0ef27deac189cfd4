"""Every archive behind TorchServe's KServe v2 envelope (service_envelope=kservev2): v2 infer and explain
requests with the image as BYTES or as a UINT8 tensor, options as parameters or inputs, v2 outputs back.

This module starts a TorchServe of its own: the envelope is a server-wide setting (config.properties), and its
archives are built with --kserve-v2 (batchSize 1)."""
import base64
import io
import subprocess
import sys
import pickle
from concurrent.futures import ThreadPoolExecutor

import requests

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from checkpoint_files import write_deeplab_checkpoint, write_swin_fork_checkpoint
from dextr_data import write_state_dict as write_dextr_state_dict
from framework_configs import BASE_TENSORMASK_YAML, SMALL_SWIN_CONFIG
from framework_configs import SMALL_TENSORMASK_YAML as CHILD_YAML
from sample_images import grace_hopper
from torchserve_harness import TorchServe, build_archive, build_in_parallel, jpeg_bytes, shipped_model_config
from vision_attribution.formats.class_names import COCO_CLASSES
from vision_attribution.formats.kserve_v2 import BATCH_OF_ONE, DATATYPES
from vision_attribution.networks.bit import ResNetV2
from vision_attribution.networks.lanet import LANET_NET_ENCODING, NetworkCIFAR, decode_lanet_encoding
from vision_attribution.networks.tensormask import TensorMask

ARCHIVES = ("effnet", "selfie", "bit", "lanet", "tensormask", "swin", "dextr", "deeplab")
BATCHED = "lanet"  # registered with batchSize 4: the envelope cannot serve batches, and says so


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve-kserve-v2")
    store = workdir / "model_store"
    store.mkdir()
    torch.manual_seed(0)
    checkpoints = {"effnet": None, "selfie": None}
    checkpoints["bit"] = workdir / "bit.pth.tar"
    torch.save({"step": 1, "model": ResNetV2((1, 1, 1, 1), 1, 10).state_dict(), "optim": {}}, checkpoints["bit"])
    checkpoints["lanet"] = workdir / "top1.pt"
    lanet = NetworkCIFAR(8, 10, 5, True, decode_lanet_encoding(LANET_NET_ENCODING))
    torch.save({"model_state_dict": lanet.state_dict()}, checkpoints["lanet"])
    model = TensorMask()
    with torch.no_grad():  # random weights whose scores straddle 0.5, so that there are detections
        torch.nn.init.normal_(model.head.cls_score.bias, mean=0.0, std=0.2)
    checkpoints["tensormask"] = workdir / "model_final.pkl"
    with open(checkpoints["tensormask"], "wb") as stream:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}}, stream)
    (workdir / "Base-TensorMask.yaml").write_text(BASE_TENSORMASK_YAML)
    (workdir / "tensormask_small.yaml").write_text(CHILD_YAML)
    checkpoints["swin"] = write_swin_fork_checkpoint(workdir / "cascade_mask_rcnn_swin_tiny_patch4_window7.pth")
    (workdir / "swin_small.py").write_text(SMALL_SWIN_CONFIG)
    checkpoints["dextr"] = write_dextr_state_dict(workdir / "dextr_state_dict.pth")
    checkpoints["deeplab"] = write_deeplab_checkpoint(workdir, "mobile")
    framework_configs = {"tensormask": workdir / "tensormask_small.yaml", "swin": workdir / "swin_small.py"}

    def builder(name: str):
        config = shipped_model_config(name)
        config["attribution"].update(n_steps=4, internal_batch_size=2)
        config.update(minWorkers=1, maxWorkers=1, batchSize=4, maxBatchDelay=500)
        extra = ["--config", str(framework_configs[name])] if name in framework_configs else []
        return lambda: build_archive(name, store, config, checkpoints[name], (*extra, *(() if name == BATCHED else ("--kserve-v2",))))

    build_in_parallel({name: builder(name) for name in ARCHIVES})
    with TorchServe(workdir, store, list(ARCHIVES), extra_config={"service_envelope": "kservev2"}) as serving:
        yield serving


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_input(data: bytes, **parameters) -> dict:
    item = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}
    return {**item, "parameters": parameters} if parameters else item


def infer(server, model: str, inputs: list, verb: str = "infer", request_id: str = "req-1"):
    return server.post(f"/v2/models/{model}/{verb}", json={"id": request_id, "inputs": inputs}, timeout=300)


def outputs(reply) -> dict[str, np.ndarray]:
    """The v2 outputs, each reshaped by its NAME.shape companion where it has one."""
    assert reply.status_code == 200, reply.text
    items = {output["name"]: output for output in reply.json()["outputs"]}
    arrays = {}
    for name, output in items.items():
        if name.endswith(".shape"):
            continue
        array = np.asarray(output["data"], dtype=DATATYPES[output["datatype"]])
        assert list(array.shape) == output["shape"]
        shape = items.get(name + ".shape")
        arrays[name] = array.reshape(shape["data"]) if shape else array
    return arrays


def test_effnet_predicts_from_base64_bytes(server):
    reply = infer(server, "effnet", [image_input(jpeg_bytes(photos.coffee()))], request_id="coffee-1")
    body = reply.json()
    assert body["id"] == "coffee-1" and body["model_name"] == "effnet"
    result = outputs(reply)
    assert result["predicted_name"].tolist() == ["espresso"] and result["predicted_class"].tolist() == [967]
    datatypes = {output["name"]: output["datatype"] for output in body["outputs"]}
    assert datatypes["probabilities"] == "FP32" and datatypes["predicted_name"] == "BYTES" and datatypes["top5/index"] == "INT64"
    assert result["probabilities"].shape == (1, 1000) and result["probabilities"].sum() == pytest.approx(1.0, abs=1e-4)
    assert result["top5/name"][0] == "espresso"


def test_effnet_explanation_with_options_as_parameters_and_inputs(server):
    inputs = [image_input(jpeg_bytes(photos.coffee()), n_steps=6), {"name": "target", "datatype": "BYTES", "shape": [1], "data": ["tiger cat"]}]
    result = outputs(infer(server, "effnet", inputs, verb="explain"))
    assert result["integrated_grads"].shape == (1, 3, 224, 224) and result["integrated_grads"].dtype == np.float32
    assert result["n_steps"].tolist() == [6] and result["target/name"].tolist() == ["tiger cat"] and result["target_class"].tolist() == [282]
    gap = result["target_at_input"][0] - result["target_at_baseline"][0]
    assert result["convergence_delta"][0] == pytest.approx(gap - result["integrated_grads"].astype(np.float64).sum(), abs=1e-3)
    assert result["idg_per_mask/masks"].shape == (16, 224, 224) and result["idg_per_mask/masks"].dtype == bool
    assert result["idg_per_mask/dividends"].sum() == pytest.approx(1.0)


def test_effnet_explanation_from_a_baseline_image_input_and_over_random_baselines(server):
    coffee = jpeg_bytes(photos.coffee())
    inputs = [image_input(coffee, n_steps=4), {"name": "baseline_image", "datatype": "BYTES", "shape": [1], "data": [b64(coffee)]}]
    itself = outputs(infer(server, "effnet", inputs, verb="explain"))
    assert itself["attribution/baseline"].tolist() == ["image"] and float(np.abs(itself["integrated_grads"]).max()) == 0
    several = outputs(infer(server, "effnet", [image_input(coffee, n_steps=4, baseline="uniform", baselines=2)], verb="explain"))
    assert several["attribution/method"].tolist() == ["expected_gradients"] and several["paths/n_steps"].tolist() == [4, 4]
    assert several["integrated_grads_std"].shape == (1, 3, 224, 224)


def test_uint8_tensor_input_equals_the_same_image_as_png(server):
    photo = np.asarray(Image.fromarray(photos.chelsea()).resize((40, 30)))
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 30, 40, 3], "data": photo.reshape(-1).tolist()}
    by_tensor = outputs(infer(server, "bit", [tensor]))
    by_bytes = outputs(infer(server, "bit", [image_input(png.getvalue())]))
    np.testing.assert_array_equal(by_tensor["output"], by_bytes["output"])
    assert by_tensor["output"].shape == (1, 10)
    hwc = {"name": "image", "datatype": "UINT8", "shape": [30, 40, 3], "data": photo.tolist()}
    np.testing.assert_array_equal(outputs(infer(server, "bit", [hwc]))["output"], by_bytes["output"])


def test_bit_explanation_with_integer_option_inputs(server):
    photo = np.asarray(Image.fromarray(photos.astronaut()).resize((32, 32)))
    inputs = [
        {"name": "image", "datatype": "UINT8", "shape": [32, 32, 3], "data": photo.reshape(-1).tolist()},
        {"name": "n_steps", "datatype": "INT32", "shape": [1], "data": [5]},
        {"name": "return_path", "datatype": "BOOL", "shape": [1], "data": [True]},
        {"name": "target", "datatype": "BYTES", "shape": [1], "data": ["ship"]},
    ]
    result = outputs(infer(server, "bit", inputs, verb="explain"))
    assert result["integrated_directional_grads"].shape == (5, 3, 32, 32) and result["intermediates"].shape == (5, 3, 32, 32)
    assert result["step_sizes"].shape == (5, 1) and result["step_sizes"].dtype == np.float64
    assert result["target_class"].tolist() == [8]


def test_selfie_masks_and_explanation(server):
    result = outputs(infer(server, "selfie", [image_input(grace_hopper())]))
    assert result["pred_masks"].shape == (1, 600, 512) and result["pred_masks"].dtype == bool
    mask = result["pred_masks"][0]
    assert mask[250:350, 200:300].mean() > 0.95  # her face
    assert result["labels"].tolist() == ["person"]
    explanation = outputs(infer(server, "selfie", [image_input(grace_hopper(), n_steps=3)], verb="explain"))
    assert explanation["integrated_grads"].shape == (1, 3, 256, 256)
    assert explanation["target/kind"].tolist() == ["region"] and explanation["idg_per_mask/dividends"].sum() == pytest.approx(1.0)


def test_tensormask_detections_and_explanation(server):
    photo = np.asarray(Image.fromarray(photos.coffee()).resize((120, 80)))
    result = outputs(infer(server, "tensormask", [image_input(jpeg_bytes(photo), threshold=0.3)]))
    count = len(result["scores"])
    assert count > 0 and (result["scores"] > 0.3).all()
    assert result["pred_masks"].shape == (count, 80, 120) and result["pred_boxes"].shape == (count, 4)
    explanation = outputs(infer(server, "tensormask", [image_input(jpeg_bytes(photo), threshold=0.3, instance=0, n_steps=1)], verb="explain"))
    assert explanation["target/kind"].tolist() == ["instance"] and explanation["n_steps"].tolist() == [1]
    assert explanation["integrated_grads"].ndim == 4


def test_swin_detections(server):
    photo = np.asarray(Image.fromarray(photos.astronaut()).resize((120, 80)))
    result = outputs(infer(server, "swin", [image_input(jpeg_bytes(photo), threshold=0.05)]))
    count = len(result["scores"])
    assert count > 0 and (result["scores"] >= 0.05).all() and (np.diff(result["scores"]) <= 0).all()
    assert result["pred_masks"].shape == (count, 80, 120) and result["pred_boxes"].shape == (count, 4)
    assert set(result["labels"].tolist()) <= set(COCO_CLASSES)


def test_dextr_mask_from_extreme_points_given_as_an_input_tensor(server):
    photo = np.asarray(Image.fromarray(photos.chelsea()).resize((90, 60)))
    points = {"name": "points", "datatype": "INT32", "shape": [4, 2], "data": [[10, 30], [80, 30], [45, 5], [45, 55]]}
    result = outputs(infer(server, "dextr", [image_input(jpeg_bytes(photo), label=3), points]))
    assert result["probability"].shape == (60, 90) and result["pred_masks"].shape == (1, 60, 90)
    assert result["points"].tolist() == points["data"] and result["label"].tolist() == [3]
    bad = infer(server, "dextr", [image_input(jpeg_bytes(photo)), {**points, "data": [[1, 1]] * 4}])
    assert bad.status_code == 400 and "points" in bad.json()["message"]


def test_deeplab_masks_and_explanation(server):
    photo = jpeg_bytes(np.asarray(Image.fromarray(photos.coffee()).resize((60, 40))))
    result = outputs(infer(server, "deeplab", [image_input(photo, image_size=64)]))
    count = len(result["labels"])
    assert count > 0 and result["pred_masks"].shape == (count, 40, 60)
    assert set(result["labels"].tolist()) <= set(result["class_names"].tolist())
    explanation = outputs(infer(server, "deeplab", [image_input(photo, image_size=64, n_steps=2)], verb="explain"))
    assert explanation["target/kind"].tolist() == ["region"] and explanation["n_steps"].tolist() == [2]
    assert explanation["idg_per_mask/dividends"].sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "inputs, status, message",
    [
        ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["@@ not base64 @@"]}], 400, "not valid base64"),
        ([image_input(b"\x89PNG broken")], 400, "not a valid image"),
        ([image_input(jpeg_bytes(photos.coffee()), n_stepz=3)], 400, "unknown field(s) ['n_stepz']"),
        ([image_input(jpeg_bytes(photos.coffee()), n_steps=0)], 400, "n_steps"),
        ([{"name": "picture", "datatype": "BYTES", "shape": [1], "data": ["x"]}], 400, "needs an input named 'image'"),
        ([{"name": "image", "datatype": "FP32", "shape": [2, 2, 3], "data": [0.5] * 12}], 400, "datatype 'FP32'"),
        ([{"name": "image", "datatype": "UINT8", "shape": [2, 8, 8, 3], "data": [0] * 384}], 400, "one image per request"),
        ([{"name": "image", "datatype": "INT32", "shape": [8, 8, 3], "data": [300] * 192}], 400, "0..255"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(server, inputs, status, message):
    reply = infer(server, "effnet", inputs)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["message"]


def test_after_the_bad_requests_the_same_worker_serves(server):
    (worker,) = server.workers("effnet")
    assert outputs(infer(server, "effnet", [image_input(jpeg_bytes(photos.coffee()))]))["predicted_name"].tolist() == ["espresso"]
    assert server.workers("effnet")[0]["pid"] == worker["pid"] and worker["status"] == "READY"


def test_archives_built_for_kserve_v2_have_batch_size_one(server):
    for name in ARCHIVES:
        assert server.model_description(name)["batchSize"] == (4 if name == BATCHED else 1)


def test_a_batch_behind_the_envelope_fails_loudly_instead_of_dropping_requests(server):
    photo = jpeg_bytes(np.asarray(Image.fromarray(photos.chelsea()).resize((32, 32))))
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda index: infer(server, BATCHED, [image_input(photo)], request_id=f"r{index}"), range(4)))
    batched = [reply for reply in replies if reply.status_code != 200]
    assert batched, "four concurrent requests within maxBatchDelay should have formed a batch"
    for reply in batched:
        assert reply.status_code == 500 and BATCH_OF_ONE in reply.json()["message"]
    single = infer(server, BATCHED, [image_input(photo)])  # alone in its batch: served
    assert outputs(single)["output"].shape == (1, 10)


def readiness(server, *models: str) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK and the Kubernetes readiness probe, against this server."""
    command = [sys.executable, "-m", "vision_attribution.clients.readiness", "--config", str(server.workdir / "config.properties"),
               "--key-file", str(server.workdir / "key_file.json"), *models]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_readiness_probe_follows_the_workers(server):
    assert readiness(server).returncode == 0
    missing = readiness(server, "effnet", "bit_r50")
    assert missing.returncode == 1 and "bit_r50: management API answered 404" in missing.stderr
    scale = f"{server.management}/models/{BATCHED}?synchronous=true"
    assert requests.put(f"{scale}&min_worker=0&max_worker=0", headers=server.auth("management"), timeout=120).status_code == 200
    try:
        stopped = readiness(server)
        assert stopped.returncode == 1 and f"{BATCHED}: workers none" in stopped.stderr
        assert readiness(server, "effnet").returncode == 0
    finally:
        requests.put(f"{scale}&min_worker=1&max_worker=1", headers=server.auth("management"), timeout=300)
    assert readiness(server).returncode == 0
