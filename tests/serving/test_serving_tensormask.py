"""End to end: the tensormask archive from a detectron2-format .pkl checkpoint and a detectron2 YAML
config with a _BASE_ chain (shared_torchserve.SHARED_ARCHIVES["tensormask"]), in a real TorchServe (the run's shared
one)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from replies import SEED_JSON, read_reply
from torchserve_harness import jpeg_bytes
from vision_attribution.networks.tensormask import COCO_CLASSES


@pytest.fixture(scope="module")
def server(shared_torchserve):
    return shared_torchserve.serve("tensormask")


def seed_image() -> np.ndarray:
    return np.asarray(Image.fromarray(photos.coffee()).resize((120, 80)))


def test_seed_request_gives_masks_at_the_original_size(server):
    bgr_chw = seed_image()[..., ::-1].transpose(2, 0, 1)
    reply = server.post("/predictions/tensormask", data=json.dumps({"img_data": bgr_chw.tolist(), "threshold": 0.3}), headers=SEED_JSON)
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    masks = result["pred_masks"]
    assert masks.dtype == torch.bool and masks.shape[1:] == (80, 120) and len(masks) > 0
    assert (result["scores"][:-1] >= result["scores"][1:]).all() and (result["scores"] > 0.3).all()
    assert result["pred_boxes"].shape == (len(masks), 4)
    assert result["labels"] == [COCO_CLASSES[c] for c in result["pred_classes"].tolist()]


def test_raw_image_threshold_and_native_resolution(server):
    loose = read_reply(server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "0.3"}).content)
    cut = float(loose["scores"][len(loose["scores"]) // 2])
    strict = read_reply(server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": str(cut)}).content)
    assert 0 < len(strict["scores"]) < len(loose["scores"]) and (strict["scores"] > cut).all()
    native = server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "0.3", "native_resolution": "true"})
    assert native.status_code == 200 and read_reply(native.content)["pred_masks"].shape[1:] == (80, 120)


def test_no_detections_is_an_empty_result_not_an_error(server):
    reply = server.post("/predictions/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "1.0"})
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert result["pred_masks"].shape == (0, 80, 120) and result["labels"] == []
    reply = server.post("/explanations/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "1.0"})
    assert reply.status_code == 422 and "no instance was detected" in reply.json()["error"]


def test_explanation_of_an_instance(server):
    reply = server.post("/explanations/tensormask", files={"image": jpeg_bytes(seed_image())}, data={"threshold": "0.3", "instance": "1"})
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
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
