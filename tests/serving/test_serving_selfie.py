"""End to end: the selfie archive (real MediaPipe weights, converted at archive time) in a real TorchServe (the
run's shared one)."""
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from replies import SEED_JSON, read_reply
from sample_images import grace_hopper
from torchserve_harness import jpeg_bytes


@pytest.fixture(scope="module")
def server(shared_torchserve):
    return shared_torchserve.serve("selfie")


def test_person_masks_on_real_photos(server):
    reply = server.post("/predictions/selfie", data=jpeg_bytes(photos.astronaut()))
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    masks = result["pred_masks"]
    assert masks.shape == (1, 512, 512) and result["labels"] == ["person"]
    assert masks[0, 80:160, 192:256].all() and masks[0, 288:432, 96:288].all()  # face and torso
    assert masks[0, :60, :60].float().mean() < 0.05 and masks[0, :60, -60:].float().mean() < 0.05  # background corners
    assert 0.2 < float(result["scores"][0]) <= 1.0

    reply = server.post("/predictions/selfie", data=grace_hopper())
    result = read_reply(reply.content)
    assert result["labels"] == ["person"] and result["pred_masks"].shape == (1, 600, 512)
    mask = result["pred_masks"][0]
    assert mask[250:350, 200:300].float().mean() > 0.95 and 0.3 < float(mask.float().mean()) < 0.9  # her face; not the flag


def test_photo_without_a_person_gives_an_empty_mask_set(server):
    reply = server.post("/predictions/selfie", data=jpeg_bytes(photos.rocket()))
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert result["pred_masks"].shape == (0, 427, 640) and result["labels"] == []
    reply = server.post("/explanations/selfie", files={"image": jpeg_bytes(photos.rocket())}, data={"n_steps": "4"})
    assert reply.status_code == 200, reply.text
    assert read_reply(reply.content)["target"]["name"] == "background"


def test_png_mask_by_accept_header(server):
    reply = server.post("/predictions/selfie", data=jpeg_bytes(photos.astronaut()), headers={"Accept": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    labels = np.asarray(Image.open(io.BytesIO(reply.content)))
    assert labels.shape == (512, 512) and set(np.unique(labels)) == {0, 1}


def test_explanation_has_ig_and_idg_per_mask(server):
    form = {"image": ("astronaut.jpg", jpeg_bytes(photos.astronaut()), "image/jpeg")}
    reply = server.post("/explanations/selfie", files=form, data={"n_steps": "16", "region_reduction": "mean"})
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert result["integrated_grads"].shape == (1, 3, 256, 256)
    assert result["target"]["kind"] == "region" and result["target"]["name"] == "person" and result["target"]["reduction"] == "mean"
    idg = result["idg_per_mask"]
    assert idg["labels"] == ["background", "person"] and idg["masks"].shape == (2, 256, 256)
    assert float(idg["dividends"].sum()) == pytest.approx(1.0)
    assert result["pred_masks"].shape == (1, 512, 512)


def test_seed_format_and_mixed_batch(server):
    body = json.dumps({"img_data": np.asarray(Image.fromarray(photos.astronaut()).resize((96, 96))).tolist()}).encode()

    def send(kind):
        return kind, server.post(f"/{kind}/selfie", data=body, headers=SEED_JSON)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, ["predictions", "explanations", "predictions", "explanations"]))
    for kind, reply in results:
        assert reply.status_code == 200, reply.text
        result = read_reply(reply.content)
        assert result["pred_masks"].shape == (1, 96, 96)
        assert ("integrated_grads" in result) == (kind == "explanations")


@pytest.mark.parametrize(
    "fields, message",
    [({"threshold": "2"}, "between 0 and 1"), ({"target": "cat"}, "unknown class"), ({"idg_grid": "4"}, "unknown field")],
)
def test_bad_options_are_refused(server, fields, message):
    reply = server.post("/explanations/selfie", files={"image": jpeg_bytes(photos.astronaut())}, data=fields)
    assert reply.status_code == 400 and message in reply.json()["error"]
