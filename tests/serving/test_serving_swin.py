"""End to end: the swin archive built by archive.sh from a checkpoint in the seed fork's layout and a user's mmdet 3
config (shared_torchserve.SHARED_ARCHIVES["swin"]), in a real TorchServe (the run's shared one), compared with mmdet's
own inference_detector on the weights and config inside the .mar.

The user's config (framework_configs.SMALL_SWIN_CONFIG) starts from the shipped one (`_base_`) and only lowers the
test resolution to 192x128 and the number of proposals and detections, so that a CPU test stays fast; the
architecture and key layout are the seed's.
"""
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from replies import SEED_JSON, read_reply
from vision_attribution.formats.class_names import COCO_CLASSES

TENSORMASK_EXPLANATION_KEYS = {
    "integrated_grads", "step_sizes", "alphas", "pred_masks", "scores", "pred_classes", "pred_boxes", "labels", "target",
    "target_at_input", "target_at_baseline", "convergence_delta", "method", "n_steps", "baseline", "attribution", "input_region", "idg_per_mask",
}  # fmt: skip


def photo(name: str) -> np.ndarray:
    """A real photo at 120x80, (80, 120, 3) uint8 RGB."""
    return np.asarray(Image.fromarray(getattr(photos, name)()).resize((120, 80)))


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(shared_torchserve):
    """(TorchServe serving swin, the .mar's path)."""
    server = shared_torchserve.serve("swin")
    return server, shared_torchserve.archive("swin")


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def mmdet_model(served, tmp_path_factory):
    """mmdet's own detector from the config and weights inside the .mar (weights read with weights_only=True)."""
    from mmdet.apis import init_detector

    unpacked = tmp_path_factory.mktemp("swin-mar")
    with zipfile.ZipFile(served[1]) as mar:
        mar.extract("swin_config.py", unpacked)
        weights = torch.load(io.BytesIO(mar.read("weights.pt")), weights_only=True)
    model = init_detector(str(unpacked / "swin_config.py"), None, device="cpu", palette="coco")
    model.load_state_dict(weights)
    return model


@pytest.fixture(scope="module")
def astronaut_detections(mmdet_model):
    """mmdet's inference_detector on the astronaut photo (BGR, as mmdet reads images): every detection over score_thr."""
    from mmdet.apis import inference_detector

    return inference_detector(mmdet_model, np.ascontiguousarray(photo("astronaut")[..., ::-1])).pred_instances


def test_detections_equal_mmdet_inference_detector(server, astronaut_detections):
    reply = server.post("/predictions/swin", files={"image": png_bytes(photo("astronaut"))}, data={"threshold": "0.05"})
    assert reply.status_code == 200, reply.text
    served, expected = read_reply(reply.content), astronaut_detections
    assert 5 <= len(expected.scores) == len(served["scores"])
    torch.testing.assert_close(served["scores"], expected.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(served["pred_boxes"], expected.bboxes, rtol=0, atol=1e-4)
    assert torch.equal(served["pred_classes"], expected.labels)
    assert torch.equal(served["pred_masks"], expected.masks) and served["pred_masks"].any()
    assert served["labels"] == [COCO_CLASSES[c] for c in expected.labels.tolist()]


def test_seed_request_and_png_reply_show_detections_above_the_default_threshold(server, astronaut_detections):
    seed_body = json.dumps({"img_data": photo("astronaut")[..., ::-1].tolist()})  # the seed's input: BGR (H, W, 3) lists
    reply = server.post("/predictions/swin", data=seed_body, headers=SEED_JSON)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/gzip", reply.text
    result = read_reply(reply.content)
    above = astronaut_detections.scores > 0.5
    assert 1 < int(above.sum()) < len(above)
    assert result["pred_masks"].dtype == torch.bool and result["pred_masks"].shape == (int(above.sum()), 80, 120)
    torch.testing.assert_close(result["scores"], astronaut_detections.scores[above], rtol=0, atol=1e-5)
    assert (result["scores"][:-1] >= result["scores"][1:]).all()  # highest score first (the seed: class, then score)
    reply = server.post("/predictions/swin", data=seed_body, headers={**SEED_JSON, "Accept": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    instances = np.asarray(Image.open(io.BytesIO(reply.content)))
    masks = result["pred_masks"].numpy()
    assert instances.shape == (80, 120) and set(np.unique(instances)) <= set(range(len(masks) + 1))
    assert (instances[masks[0]] == 1).all() and (instances[~masks.any(0)] == 0).all()  # the highest score wins overlaps


def test_threshold_option_selects_detections(server, astronaut_detections):
    scores = astronaut_detections.scores
    cut = float(scores[len(scores) // 2])
    reply = server.post("/predictions/swin", files={"image": png_bytes(photo("astronaut"))}, data={"threshold": str(cut)})
    result = read_reply(reply.content)
    assert len(result["scores"]) == int((scores > cut).sum()) and (result["scores"] > cut).all()


def test_no_detection_is_an_empty_result_and_a_blank_png(server):
    coffee = png_bytes(photo("coffee"))  # nothing above 0.5 in this photo with these weights
    reply = server.post("/predictions/swin", data=coffee)
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert result["pred_masks"].shape == (0, 80, 120) and result["labels"] == [] and result["pred_boxes"].shape == (0, 4)
    reply = server.post("/predictions/swin", data=coffee, headers={"Accept": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    blank = np.asarray(Image.open(io.BytesIO(reply.content)))
    assert blank.shape == (80, 120) and not blank.any()
    reply = server.post("/explanations/swin", data=coffee)
    assert reply.status_code == 422 and "no instance was detected" in reply.json()["error"]


def test_explanation_with_idg_in_a_batch_with_a_prediction(server, astronaut_detections):
    """An explanation and a prediction sent together (batchSize 2) each get their own kind of answer; the explained
    score, recomputed through backbone, neck, RoIAlign and the three stages, is mmdet's score for that detection."""
    astronaut = png_bytes(photo("astronaut"))

    def send(kind):
        return server.post(f"/{kind}/swin", files={"image": astronaut}, data={"instance": "1"} if kind == "explanations" else {})

    with ThreadPoolExecutor(2) as pool:
        explained, predicted = pool.map(send, ["explanations", "predictions"])
    assert explained.status_code == 200 and predicted.status_code == 200, (explained.text, predicted.text)
    assert "integrated_grads" not in read_reply(predicted.content)
    result = read_reply(explained.content)
    assert set(result) == TENSORMASK_EXPLANATION_KEYS
    target, expected = result["target"], astronaut_detections
    assert target["kind"] == "instance" and target["instance"] == 1 and target["index"] == int(expected.labels[1])
    assert abs(result["target_at_input"] - float(expected.scores[1])) < 1e-5
    assert abs(target["score"] - float(expected.scores[1])) < 1e-5
    assert result["integrated_grads"].shape == (1, 3, 128, 192) and result["integrated_grads"].abs().sum() > 0
    assert result["n_steps"] == 2 and len(target["location"]) == 13
    idg = result["idg_per_mask"]
    assert idg["masks"].shape == (len(idg["labels"]), 128, 192) and idg["labels"][-1] == "background"
    assert len(idg["idg"]) == len(result["scores"]) + 1 and float(idg["dividends"].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "img_data, message",
    [
        (photo("astronaut")[..., ::-1].transpose(2, 0, 1).tolist(), "120 channels"),  # tensormask's (3, H, W) layout
        (np.zeros((8, 8, 4), dtype=int).tolist(), "4 channels"),
        ([[[]]], "0 channels"),  # a zero-size image
    ],
)
def test_bad_inputs_are_refused(server, img_data, message):
    reply = server.post("/predictions/swin", data=json.dumps({"img_data": img_data}), headers=SEED_JSON)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text

