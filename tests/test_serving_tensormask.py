"""End to end: the tensormask archive from a detectron2-format .pkl checkpoint and a detectron2 YAML
config with a _BASE_ chain, in a real TorchServe."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from test_serving_classifiers import SEED_JSON, seed_client_read
from test_tensormask_model import BASE_TENSORMASK_YAML
from torchserve_harness import TorchServe, build_archive, jpeg_bytes, shipped_model_config
from vision_attribution.networks.tensormask import COCO_CLASSES, TensorMask

CHILD_YAML = '_BASE_: "Base-TensorMask.yaml"\nINPUT:\n  MIN_SIZE_TEST: 96\n  MAX_SIZE_TEST: 160\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve-tensormask")
    store = workdir / "model_store"
    store.mkdir()
    torch.manual_seed(0)
    model = TensorMask()
    with torch.no_grad():  # random weights whose scores straddle 0.5, so that thresholds matter
        torch.nn.init.normal_(model.head.cls_score.bias, mean=0.0, std=0.2)
    checkpoint = workdir / "model_final.pkl"
    with open(checkpoint, "wb") as stream:  # detectron2 model-zoo format: numpy arrays under "model"
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "test"}, stream)
    configs = workdir / "configs"
    configs.mkdir()
    (configs / "Base-TensorMask.yaml").write_text(BASE_TENSORMASK_YAML)
    (configs / "tensormask_small.yaml").write_text(CHILD_YAML)
    config = shipped_model_config("tensormask")
    config["attribution"].update(n_steps=3, internal_batch_size=3)
    build_archive("tensormask", store, config, checkpoint, ["--config", str(configs / "tensormask_small.yaml")])
    with TorchServe(workdir, store, ["tensormask"]) as serving:
        yield serving


def seed_image() -> np.ndarray:
    return np.asarray(Image.fromarray(photos.coffee()).resize((120, 80)))


def test_seed_request_gives_masks_at_the_original_size(server):
    bgr_chw = seed_image()[..., ::-1].transpose(2, 0, 1)
    reply = server.post("/predictions/tensormask", data=json.dumps({"img_data": bgr_chw.tolist(), "threshold": 0.3}), headers=SEED_JSON)
    assert reply.status_code == 200, reply.text
    result = seed_client_read(reply.content)
    masks = result["pred_masks"]
    assert masks.dtype == torch.bool and masks.shape[1:] == (80, 120) and len(masks) > 0
    assert (result["scores"][:-1] >= result["scores"][1:]).all() and (result["scores"] > 0.3).all()
    assert result["pred_boxes"].shape == (len(masks), 4)
    assert result["labels"] == [COCO_CLASSES[c] for c in result["pred_classes"].tolist()]


def test_raw_image_threshold_and_native_resolution(server):
    loose = seed_client_read(server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "0.3"}).content)
    cut = float(loose["scores"][len(loose["scores"]) // 2])
    strict = seed_client_read(server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": str(cut)}).content)
    assert 0 < len(strict["scores"]) < len(loose["scores"]) and (strict["scores"] > cut).all()
    native = server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "0.3", "native_resolution": "true"})
    assert native.status_code == 200 and seed_client_read(native.content)["pred_masks"].shape[1:] == (80, 120)


def test_no_detections_is_an_empty_result_not_an_error(server):
    reply = server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "1.0"})
    assert reply.status_code == 200, reply.text
    result = seed_client_read(reply.content)
    assert result["pred_masks"].shape == (0, 80, 120) and result["labels"] == []
    reply = server.post("/explanations/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "1.0"})
    assert reply.status_code == 422 and "no instance was detected" in reply.json()["error"]


def test_explanation_of_an_instance(server):
    reply = server.post("/explanations/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "0.3", "instance": "1"})
    assert reply.status_code == 200, reply.text
    result = seed_client_read(reply.content)
    assert result["target"]["kind"] == "instance" and result["target"]["instance"] == 1
    assert result["target"]["score"] == pytest.approx(float(result["scores"][1]), rel=1e-5)
    assert result["target_at_input"] == pytest.approx(result["target"]["score"], rel=1e-4)
    assert result["integrated_grads"].shape == (1, 3, 96, 144)
    idg = result["idg_per_mask"]
    assert len(idg["labels"]) == len(idg["idg"]) >= len(result["scores"])
    assert float(idg["dividends"].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"img_data": seed_image().tolist()}, "expected 3"),  # H x W x 3 lists: the swin layout, not tensormask's
        ({"img_data": np.zeros((4, 8, 8), dtype=int).tolist()}, "4 channels"),
        ({"img_data": [[[]], [[]], [[]]]}, "empty"),  # a zero-size image
        ({"img_data": seed_image()[..., ::-1].transpose(2, 0, 1).tolist(), "instance": -1}, "at least 0"),
    ],
)
def test_bad_inputs_are_refused(server, body, message):
    reply = server.post("/predictions/tensormask", data=json.dumps(body), headers=SEED_JSON)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text
