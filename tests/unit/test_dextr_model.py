"""DEXTR without TorchServe: the network and geometry against the seed's own library (dextr 0.1.2), the checkpoint
formats users have, and the service a worker runs (request checks, replies, explanations)."""
import base64
import io
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as photos

from dextr_data import seed_resunet, write_pickled_dextr_model, write_state_dict
from replies import read_reply
from torchserve_harness import ARCHIVE_CONFIGS, REPO, jpeg_bytes
from vision_attribution.archives import load_service
from vision_attribution.archives.build import stage_archive
from vision_attribution.clients.bridges.folder_poll import write_through
from vision_attribution.networks import dextr as D
from vision_attribution.serving.jobs import IncomingRequest

PUBLISHED_NAME = "dextr_pascalvoc_resunet101-a2d81727.pth"  # the published checkpoint's file name


def test_network_input_and_paste_back_equal_the_seed_library():
    from dextr.data_pipeline import dextr_transforms as seed

    image = photos.astronaut()
    crop = D.CropSettings((128, 96), 10, 10.0)
    for points_xy in ([[150.5, 30.2], [300, 200], [160, 500.7], [20, 300]], [[-20, 40], [90, -30], [530, 200], [100, 540]], [[200, 10], [205, 10], [210, 400], [200, 400]]):
        points_xy = np.asarray(points_xy, dtype=np.float64)
        ours, box = D.network_input(image, points_xy, crop)
        sample = {"input": Image.fromarray(image), "extreme_points": points_xy[:, ::-1]}
        transform = seed.DextrCropWithHeatmapTransform(crop.size, crop.padding, crop.blob_sigma)
        theirs = seed.DextrNormalize()(seed.DextrToTensor()(transform(sample)))
        assert torch.equal(ours[0], theirs["input"]) and np.array_equal(box, theirs["crop_yx"].numpy())
        probability = np.random.default_rng(0).random(crop.size).astype(np.float32)
        pasted = D.paste_probability(probability, box, image.shape[:2])
        assert np.array_equal(pasted, np.asarray(seed.paste_mask_into_image(image.shape[:2], probability, box)))


def test_the_network_equals_the_seed_librarys_resunet101_and_dextr_model_predict():
    from dextr.model import DextrModel

    seed_network = seed_resunet()
    ours = D.load_network(seed_network.state_dict())
    image, points_xy = photos.coffee(), np.array([[120.0, 80.0], [400.0, 60.0], [450.0, 300.0], [200.0, 380.0]])
    seed_probability = DextrModel(seed_network, (96, 96), 10, 10.0).predict([image], [points_xy[:, ::-1]])[0]
    inputs, box = D.network_input(image, points_xy, D.CropSettings((96, 96), 10, 10.0))
    with torch.no_grad():
        logits = ours(inputs)["out"]
        assert torch.equal(logits, seed_network(inputs)["out"])
    pasted = D.paste_probability(torch.sigmoid(logits)[0, 0].numpy(), box, image.shape[:2])
    np.testing.assert_allclose(pasted / 255.0, seed_probability, atol=1e-7)


@pytest.mark.slow
def test_a_pickled_dextr_model_is_read_only_when_trusted_and_keeps_its_crop_settings(tmp_path):
    path = write_pickled_dextr_model(tmp_path / PUBLISHED_NAME, size=96, padding=6, sigma=7.5)
    with pytest.raises(ValueError, match="whole pickled DextrModel.*--trust-checkpoint"):
        D.read_checkpoint(path)
    checkpoint = D.read_checkpoint(path, trust=True)
    assert checkpoint.source == "DextrModel" and checkpoint.crop == D.CropSettings((96, 96), 6, 7.5)
    reference = seed_resunet().state_dict()
    assert checkpoint.state_dict.keys() == reference.keys()
    assert all(torch.equal(checkpoint.state_dict[key], reference[key]) for key in reference)
    done = subprocess.run([str(REPO / "archive.sh"), "dextr", "--checkpoint", str(path), "--out", str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--trust-checkpoint" in done.stderr and not (tmp_path / "store" / "dextr.mar").exists()


@pytest.mark.slow
def test_plain_state_dicts_load_safely_with_the_default_crop(tmp_path):
    checkpoint = D.read_checkpoint(write_state_dict(tmp_path / "dextr_resunet101.pth"))
    assert checkpoint.source == "state dict" and checkpoint.crop == D.CropSettings((512, 512), 10, 10.0)
    D.load_network(checkpoint.state_dict)
    state = seed_resunet().state_dict()
    del state["decoder2.conv_bn.running_var"]
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="decoder2.conv_bn.running_var"):
        D.load_network(D.read_checkpoint(tmp_path / "broken.pth").state_dict)
    torch.save({"model": seed_resunet().state_dict(), "crop": {"size": [100, 100], "padding": 10, "blob_sigma": 10}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="multiples of 32"):
        D.read_checkpoint(tmp_path / "odd.pt")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The dextr archive staged by archive.sh's code from a training checkpoint with 64x64 crops, loaded as a worker."""
    workdir = tmp_path_factory.mktemp("dextr-stage")
    torch.save({"model": seed_resunet().state_dict(), "crop": {"size": [64, 64], "padding": 4, "blob_sigma": 4}, "step": 0}, workdir / "checkpoint.pt")
    config = yaml.safe_load((ARCHIVE_CONFIGS / "dextr.yaml").read_text())
    archive = workdir / "archive"
    archive.mkdir()
    stage_archive("dextr", archive, config, workdir / "checkpoint.pt", None, False)
    return load_service(archive, config, torch.device("cpu"))


POINTS = [[150, 30], [300, 200], [160, 500], [20, 300]]


def serve(service, fields: dict, explain: bool = False, accept: str | None = None):
    (reply,) = service.handle_batch([IncomingRequest(fields=fields, explain=explain, headers={"Accept": accept} if accept else {})])
    return reply


@pytest.mark.parametrize(
    "points, label, message",
    [
        (None, None, "needs 'points'"),
        ("[[1, 2], [3, 4], [5, 6]]", None, "four [x, y] points"),
        ('[[1, 2], [3, "x"], [5, 6], [7, 8]]', None, "finite numbers"),
        ("[[7, 7], [7, 7], [7, 7], [7, 7]]", None, "all four are [7, 7]"),
        ("[[1, 2], [3, 4], [5, 6], [2000, 8]]", None, "far outside"),
        ("[[1, 9], [3, 9], [5, 9], [7, 9]]", None, "all have y = 9"),
        ("[[1, 2], [3, 4], [5, 6], [7, 8]]", "256", "between 1 and 255"),
        ("not json", None, "(JSON)"),
    ],
)
def test_bad_prompts_are_refused_with_400_naming_the_problem(service, points, label, message):
    fields = {"body": jpeg_bytes(photos.astronaut())}
    if points is not None:
        fields["points"] = points.encode()
    if label is not None:
        fields["label"] = label.encode()
    reply = serve(service, fields)
    assert reply.status == 400 and message in json.loads(reply.body)["error"]


def test_replies_agree_with_each_other_and_the_probability_map(service):
    fields = {"body": jpeg_bytes(photos.astronaut()), "points": json.dumps(POINTS).encode(), "label": b"9", "threshold": b"0.4"}
    tensors = read_reply(serve(service, fields, accept="application/gzip").body)
    mask = tensors["probability"].numpy() >= 0.4
    assert tensors["pred_masks"].shape == (1, 512, 512) and np.array_equal(tensors["pred_masks"][0].numpy(), mask)
    png = np.asarray(Image.open(io.BytesIO(serve(service, fields, accept="image/png").body)))
    assert png.dtype == np.uint8 and np.array_equal(png, mask * np.uint8(9))
    seed_reply = json.loads(serve(service, fields).body)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(seed_reply["mask"])))), png)
    assert seed_reply["meta"] == {"segmenter": {"type": "dextr"}, "prompt": {"points": [[float(x), float(y)] for x, y in POINTS], "label": 9}}
    assert all(len({tuple(p) for p in polygon}) >= 3 and all(isinstance(v, int) for p in polygon for v in p) for polygon in seed_reply["contours"])
    npz = np.load(io.BytesIO(serve(service, fields, accept="application/x-npz").body), allow_pickle=False)
    assert np.array_equal(npz["pred_masks"][0], mask) and npz["label"] == 9


@pytest.mark.slow
def test_explanation_integrates_the_object_logits_over_all_four_channels(service):
    fields = {"body": jpeg_bytes(photos.astronaut()), "points": json.dumps(POINTS).encode(), "n_steps": b"6", "threshold": b"0.3"}
    reply = serve(service, fields, explain=True, accept="application/json")
    if reply.status == 422:
        pytest.fail(f"the random network predicts nothing here: {reply.body}")
    result = json.loads(reply.body)
    ig = np.asarray(result["integrated_grads"])
    assert ig.shape == (1, 4, 64, 64)
    shares, sums = result["channel_attribution"]["share"], result["channel_attribution"]["sum"]
    assert shares["image"] + shares["heatmap"] == pytest.approx(1.0)
    assert shares["heatmap"] == pytest.approx(np.abs(ig[0, 3]).sum() / np.abs(ig).sum())
    assert sums["image"] + sums["heatmap"] == pytest.approx(ig.sum(), rel=1e-6)
    idg = result["idg_per_mask"]
    masks = np.asarray(idg["masks"], dtype=bool)
    assert idg["labels"] == ["object", "background"] and np.array_equal(masks[0], ~masks[1])
    assert result["target"]["pixels"] == masks[0].sum() and sum(idg["dividends"]) == pytest.approx(1.0)
    left, top, right, bottom = result["input_region"]
    assert left < 20 and top < 30 and right > 300 and bottom > 500  # the crop box around the points


def test_an_empty_mask_cannot_be_explained(service, monkeypatch):
    monkeypatch.setattr(service.adapter, "logits_of", lambda inputs: torch.full((len(inputs), 1, *inputs.shape[2:]), -3.0))
    fields = {"body": jpeg_bytes(photos.astronaut()), "points": json.dumps(POINTS).encode(), "n_steps": b"2"}
    reply = serve(service, fields, explain=True)
    assert reply.status == 422 and "lower 'threshold'" in json.loads(reply.body)["error"]


def test_outputs_are_renamed_into_place_from_the_tmp_folder(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out").mkdir()
    write_through(b"mask", tmp_path / "out" / "a.png", tmp_path / "tmp")
    assert (tmp_path / "out" / "a.png").read_bytes() == b"mask" and not list((tmp_path / "tmp").iterdir())
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["a.png"]
