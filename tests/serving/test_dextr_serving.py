"""DEXTR end to end: training on a dataset made from packaged photos, archive.sh, a real TorchServe, the seed's
Redis mode against a real redis-server (restart included) and its folder-poll mode, all through the client's
commands as a user runs them.

Two archives are served by the run's shared TorchServe: its `dextr`, built from the published checkpoint's format (a
whole pickled DextrModel, 128x128 crops, its classifier set to a constant logit so that the mask is exactly the pasted
crop), and this module's `dextr_trained`, built from what `vision-attribution dextr-train` wrote.
"""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from dextr_data import seed_resunet, write_voc_dataset
from shared_torchserve import DEXTR_BOX_LOGIT, DEXTR_CROP
from redis_harness import RedisServer
from replies import read_reply
from torchserve_harness import build_archive, jpeg_bytes, shipped_model_config
from vision_attribution.networks.dextr import CropSettings, network_input, new_network, paste_probability, read_checkpoint
from vision_attribution.training.dextr import InstanceMasks, extreme_points, split_images

CLIENT = str(Path(sys.executable).parent / "vision-attribution")
BOX_CROP = CropSettings((DEXTR_CROP, DEXTR_CROP), 10, 10.0)  # the shared `dextr` archive's crops
TRAIN = ["--batch-size", "4", "--crop-size", "64", "--padding", "4", "--blob-sigma", "4", "--optimizer", "adam",
         "--lr", "0.001", "--val-fraction", "0.25", "--val-every", "6", "--checkpoint-every", "3"]  # fmt: skip
POINTS = [[150, 30], [300, 200], [160, 500], [20, 300]]


def box_mask(image_shape: tuple[int, int], points, threshold: float = 0.5) -> np.ndarray:
    """What the `dextr` archive must answer: the crop around the points, pasted back, thresholded."""
    _, box = network_input(np.zeros((*image_shape, 3), np.uint8), np.asarray(points, dtype=np.float64), BOX_CROP)
    constant = np.full(BOX_CROP.size, torch.sigmoid(torch.tensor(DEXTR_BOX_LOGIT)).item(), dtype=np.float32)
    return paste_probability(constant, box, image_shape) / 255.0 >= threshold


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """dextr-train for 6 steps, then resumed to 12; returns the dataset folder, the output folder and the logs."""
    root = tmp_path_factory.mktemp("dextr-train")
    images, masks = write_voc_dataset(root / "voc", images=12)
    command = [CLIENT, "dextr-train", "--images", str(images), "--masks", str(masks), "--out", str(root / "out"), *TRAIN]
    first = subprocess.run([*command, "--steps", "6"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run([*command, "--steps", "12", "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    return {"root": root, "images": images, "masks": masks, "out": root / "out", "logs": (first, resumed)}


@pytest.fixture(scope="module")
def server(shared_torchserve, tmp_path_factory, trained):
    workdir = tmp_path_factory.mktemp("torchserve-dextr")
    config = {**shipped_model_config("dextr"), "minWorkers": 1, "maxWorkers": 1}
    shared_torchserve.serve("dextr")
    archives = {"dextr_trained": lambda store: build_archive("dextr", store, config, trained["out"] / "checkpoint.pt", name="dextr_trained", config_dir=workdir)}
    with shared_torchserve.private(archives, __name__) as serving:
        yield serving


# Training ---------------------------------------------------------------------------------------------------------


def test_training_loss_falls_and_the_held_out_iou_beats_the_untrained_start(trained):
    metrics = json.loads((trained["out"] / "metrics.json").read_text())
    losses = [loss for _, loss in metrics["history"]["loss"]]
    assert [step for step, _ in metrics["history"]["loss"]] == list(range(1, 13))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    ious = dict((step, iou) for step, iou in metrics["history"]["val_iou"])
    assert sorted(ious) == [0, 6, 12] and ious[12] > ious[0] + 0.2
    first, resumed = trained["logs"]
    assert "dextr-train" in first.stderr and "6/6" in first.stderr  # the progress bar
    assert "12/12" in resumed.stderr and f"-> {ious[12]:.3f} at step 12" in resumed.stdout


def test_the_resumed_checkpoint_carries_the_whole_run(trained):
    checkpoint = torch.load(trained["out"] / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 12 and checkpoint["crop"] == {"size": [64, 64], "padding": 4.0, "blob_sigma": 4.0}
    adam_steps = {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {12}  # the optimizer went on from step 6 rather than starting again


def test_the_trained_checkpoint_serves_what_training_measured(server, trained):
    """Held-out objects through archive.sh + TorchServe give the IoU that dextr-train reported."""
    data = InstanceMasks(trained["images"], trained["masks"], 16)
    _, held_out = split_images(len(data.pairs), 0.25, 0)
    ious = []
    for image_index, instance in data.subset(held_out):
        ids = data.instance_ids(image_index)
        points = extreme_points(ids == instance, None).tolist()
        request = {"image": base64.b64encode(data.pairs[image_index][0].read_bytes()).decode(), "points": points}
        reply = server.post("/predictions/dextr_trained", json=request, headers={"Accept": "image/png"})
        assert reply.status_code == 200, reply.text
        predicted, truth, valid = read_png(reply.content) == 1, ids == instance, ids != 255
        ious.append(((predicted & truth) & valid).sum() / ((predicted | truth) & valid).sum())
    history = json.loads((trained["out"] / "metrics.json").read_text())["history"]["val_iou"]
    assert np.mean(ious) == pytest.approx(history[-1][1], abs=1e-9) and np.mean(ious) > history[0][1]


def torchvision_resnet101_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's resnet101 key names and shapes with values no initialisation gives (so that the weights found
    after training can only have come from this file), scaled as trained weights are (fan-in scaled filters,
    BatchNorm scales near 1)."""
    from torchvision.models import resnet101

    generator = torch.Generator().manual_seed(11)
    state = {}
    for name, tensor in resnet101(weights=None).state_dict().items():
        if not tensor.is_floating_point():
            state[name] = tensor
        elif tensor.dim() > 1:
            state[name] = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
        elif name.endswith("running_var") or name.endswith("weight"):
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.05
    return state


@pytest.mark.parametrize("start", ["--init-resnet101", "--init-checkpoint"])
def test_training_starts_from_the_given_weights(tmp_path, start):
    """One step at learning rate 0 leaves every parameter where the start put it: the checkpoint written must hold
    the given weights (conv1's heatmap filters excepted, which a resnet101 has none of)."""
    images, masks = write_voc_dataset(tmp_path / "voc", images=2)
    if start == "--init-resnet101":
        given = torchvision_resnet101_state_dict()
        torch.save(given, tmp_path / "resnet101-63fe2227.pth")
        options = [start, str(tmp_path / "resnet101-63fe2227.pth"), "--crop-size", "64"]
        encoder = dict(new_network().base_model.named_parameters())
        expected = {f"base_model.{name}": value for name, value in given.items() if name in encoder}
    else:  # the published format, a whole pickled DextrModel, its random weights moved off any initialisation
        from dextr.model import DextrModel

        network, generator = seed_resunet(), torch.Generator().manual_seed(12)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
        torch.save(DextrModel(network, (64, 64), 4, 4.0), tmp_path / "dextr_pascalvoc_resunet101.pth")
        given = read_checkpoint(tmp_path / "dextr_pascalvoc_resunet101.pth", trust=True).state_dict
        options = [start, str(tmp_path / "dextr_pascalvoc_resunet101.pth"), "--trust-checkpoint"]  # its crop: 64, padding 4, sigma 4
        expected = {name: given[name] for name, _ in new_network().named_parameters()}
    command = [CLIENT, "dextr-train", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "out"), "--steps", "1",
               "--batch-size", "2", "--lr", "0", "--val-fraction", "0", "--device", "cpu", *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    crop = {"size": [64, 64], "padding": 10.0, "blob_sigma": 10.0} if start == "--init-resnet101" else {"size": [64, 64], "padding": 4.0, "blob_sigma": 4.0}
    assert checkpoint["pretrained"] is True and checkpoint["crop"] == crop
    trained = checkpoint["model"]
    torch.manual_seed(0)
    fresh = new_network().state_dict()  # what dextr-train (--seed 0) starts from without either option
    if start == "--init-resnet101":
        conv1 = "base_model.conv1.weight"
        assert torch.equal(trained[conv1][:, :3], given["conv1.weight"])  # the RGB filters; the heatmap's are new
        expected.pop(conv1)
    assert len(expected) > 300
    for name, value in expected.items():
        assert torch.equal(trained[name], value.float()), name
        assert not torch.equal(fresh[name], value.float()), name  # the untouched start would not have given it


# Serving ----------------------------------------------------------------------------------------------------------


def test_mask_png_seed_json_opex_and_tensors(server):
    from opex import ObjectPredictions

    photo = jpeg_bytes(photos.astronaut())
    expected = box_mask((512, 512), POINTS)
    form = {"points": json.dumps(POINTS), "label": "3"}
    reply = server.post("/predictions/dextr", files={"image": ("astronaut.jpg", photo)}, data=form, headers={"Accept": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(reply.content))
    assert png.mode == "L" and np.array_equal(np.asarray(png), expected * np.uint8(3))

    request = {"image": base64.b64encode(photo).decode(), "points": POINTS, "label": 3}
    seed = server.post("/predictions/dextr", json=request).json()  # no Accept: the seed's JSON
    assert np.array_equal(read_png(base64.b64decode(seed["mask"])), expected * np.uint8(3))
    assert seed["meta"] == {"segmenter": {"type": "dextr"}, "prompt": {"points": POINTS, "label": 3}}
    (outline,) = seed["contours"]
    ys, xs = np.nonzero(expected)
    xs_out, ys_out = [x for x, _ in outline], [y for _, y in outline]
    assert min(xs_out) >= xs.min() - 1 and max(xs_out) <= xs.max() and min(ys_out) >= ys.min() - 1 and max(ys_out) <= ys.max()

    reply = server.post("/predictions/dextr", json=request, headers={"Accept": "application/vnd.opex+json"})
    opex = ObjectPredictions.from_json_string(reply.text)  # validates against the opex schema
    (found,) = opex.objects
    assert found.label == "3" and len(found.polygon.points) >= 3 and found.bbox.left == min(xs_out) and found.bbox.bottom == max(ys_out)

    tensors = server.post("/predictions/dextr", json=request, headers={"Accept": "application/gzip"}).content
    result = read_reply(tensors)
    assert np.array_equal(result["pred_masks"][0].numpy(), expected) and result["probability"].shape == (512, 512)


@pytest.mark.parametrize(
    "request_fields, message",
    [({}, "needs 'points'"), ({"points": [[1, 2], [3, 4]]}, "four [x, y] points"), ({"points": POINTS, "label": 0}, "between 1 and 255"),
     ({"points": POINTS, "colour": "red"}, "unknown field")],
)  # fmt: skip
def test_bad_requests_are_400_and_the_worker_goes_on(server, request_fields, message):
    request = {"image": base64.b64encode(jpeg_bytes(photos.coffee())).decode(), **request_fields}
    reply = server.post("/predictions/dextr", json=request)
    assert reply.status_code == 400 and message in reply.json()["error"]
    good = {"image": request["image"], "points": [[10, 10], [200, 20], [150, 300], [30, 200]]}
    assert server.post("/predictions/dextr", json=good).status_code == 200


def test_explanation_reports_the_heatmap_channels_share(server):
    """The briefly trained network's probabilities vary from run to run, so the threshold is taken from its own
    prediction: one level (1/255) under the highest pasted probability, which is at most the crop's highest (the
    paste truncates to multiples of 1/255 and interpolates bilinearly), so the explained mask is never empty."""
    request = {"image": base64.b64encode(jpeg_bytes(photos.astronaut())).decode(), "points": POINTS}
    predicted = server.post("/predictions/dextr_trained", json=request, headers={"Accept": "application/gzip"})
    assert predicted.status_code == 200, predicted.text
    highest = int(round(float(read_reply(predicted.content)["probability"].max()) * 255))
    threshold = max(highest - 1, 0) / 255
    reply = server.post("/explanations/dextr_trained", json={**request, "n_steps": 4, "threshold": threshold})
    assert reply.status_code == 200, reply.text
    result = read_reply(reply.content)
    assert result["target"]["pixels"] > 0
    assert result["integrated_grads"].shape == (1, 4, 64, 64)
    shares = result["channel_attribution"]["share"]
    assert shares["heatmap"] + shares["image"] == pytest.approx(1.0) and 0 < shares["heatmap"] < 1
    assert result["idg_per_mask"]["labels"][0] == "object"


# Redis mode -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_bridge(tmp_path_factory, server):
    """A redis-server and `vision-attribution dextr-redis` in front of the TorchServe; yields (redis, bridge log)."""
    workdir = tmp_path_factory.mktemp("redis")
    redis_server = RedisServer(workdir).start()
    log_path = workdir / "bridge.log"
    command = [CLIENT, "dextr-redis", "--redis_port", str(redis_server.port), "--redis_in", "dextr_in", "--redis_out", "dextr_out",
               "--url", server.inference, "--token-file", str(server.workdir / "key_file.json"), "--workers", "4"]  # fmt: skip
    bridge = subprocess.Popen(command, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_subscriber(redis_server, log_path)
        yield redis_server, log_path
    finally:
        os.killpg(bridge.pid, signal.SIGTERM)
        bridge.wait(timeout=60)
        redis_server.stop()


def wait_for_subscriber(redis_server: RedisServer, log_path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if dict(redis_server.client().pubsub_numsub("dextr_in")).get(b"dextr_in") == 1:
                return
        except Exception:  # noqa: BLE001 - Redis may still be starting
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the bridge did not subscribe:\n{log_path.read_text()}")


def exchange(redis_server: RedisServer, messages: list, timeout: float = 300) -> list[dict]:
    """Publish the messages as the seed's client does and collect as many replies."""
    listener = redis_server.client().pubsub(ignore_subscribe_messages=True)
    listener.subscribe("dextr_out")
    sender = redis_server.client()
    for message in messages:
        sender.publish("dextr_in", message if isinstance(message, (bytes, str)) else json.dumps(message))
    replies, deadline = [], time.time() + timeout
    while len(replies) < len(messages) and time.time() < deadline:
        message = listener.get_message(timeout=1.0)
        if message is not None:
            replies.append(json.loads(message["data"]))
    listener.close()
    assert len(replies) == len(messages), f"{len(replies)} replies to {len(messages)} requests"
    return replies


def seed_request(points, label: int = 1) -> dict:
    return {"image": base64.b64encode(jpeg_bytes(photos.astronaut())).decode(), "points": points, "label": label}


def test_redis_replies_as_the_seed_did(redis_bridge, server):
    redis_server, _ = redis_bridge
    (reply,) = exchange(redis_server, [seed_request(POINTS, 4)])
    assert set(reply) == {"mask", "contours", "meta"}
    assert reply == server.post("/predictions/dextr", json=seed_request(POINTS, 4)).json()
    assert np.array_equal(read_png(base64.b64decode(reply["mask"])), box_mask((512, 512), POINTS) * np.uint8(4))


def test_redis_answers_every_failure_with_an_error_naming_it(redis_bridge):
    redis_server, _ = redis_bridge
    messages = [b"not json", json.dumps([1, 2]), seed_request([[1, 2], [3, 4]]), seed_request(POINTS, 300), {"points": POINTS}]
    replies = exchange(redis_server, messages)
    errors = sorted(reply["error"] for reply in replies)
    assert all(reply["meta"]["segmenter"] == {"type": "dextr"} for reply in replies)
    for expected in ("not JSON", "must be a JSON object", "four [x, y] points", "between 1 and 255", "'image'"):
        assert any(expected in error for error in errors), (expected, errors)


def test_redis_answers_concurrent_requests_each_with_its_own_reply(redis_bridge):
    redis_server, _ = redis_bridge
    prompts = [([[40 + 10 * i, 60], [300, 40 + 5 * i], [280, 400], [50, 380 - 7 * i]], i + 1) for i in range(6)]
    replies = exchange(redis_server, [seed_request(points, label) for points, label in prompts])
    by_label = {reply["meta"]["prompt"]["label"]: reply for reply in replies}
    assert sorted(by_label) == [1, 2, 3, 4, 5, 6]
    for points, label in prompts:
        assert by_label[label]["meta"]["prompt"]["points"] == points
        assert np.array_equal(read_png(base64.b64decode(by_label[label]["mask"])), box_mask((512, 512), points) * np.uint8(label))


def test_the_redis_bridge_survives_a_redis_restart(redis_bridge):
    redis_server, log_path = redis_bridge
    before = redis_server.process.pid
    redis_server.stop()
    time.sleep(2)
    redis_server.start()
    assert redis_server.process.pid != before
    wait_for_subscriber(redis_server, log_path)  # the bridge subscribed again on the new server
    (reply,) = exchange(redis_server, [seed_request(POINTS, 2)])
    assert reply["meta"]["prompt"]["label"] == 2 and "mask" in reply


# Folder-poll mode -------------------------------------------------------------------------------------------------


def poll(server, folders: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [CLIENT, "dextr-poll", "--prediction_in", str(folders["in"]), "--prediction_out", str(folders["out"]),
               "--url", server.inference, "--token-file", str(server.workdir / "key_file.json"), "--settle", "0", *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture
def folders(tmp_path):
    names = {name: tmp_path / name for name in ("in", "out", "tmp")}
    for folder in names.values():
        folder.mkdir()
    return names


def test_folder_poll_writes_mask_and_opex_and_moves_bad_pairs_aside(server, folders):
    from opex import ObjectPredictions

    source = folders["in"]
    (source / "astronaut.jpg").write_bytes(jpeg_bytes(photos.astronaut()))
    (source / "astronaut.points").write_text(json.dumps({"points": POINTS}))
    Image.fromarray(photos.coffee()).save(source / "coffee.png")
    coffee_points = [[100, 50], [500, 120], [380, 390], [60, 300]]
    (source / "coffee.points").write_text(json.dumps({"points": coffee_points, "label": 5}))
    (source / "three.jpg").write_bytes(jpeg_bytes(photos.rocket()))
    (source / "three.points").write_text(json.dumps({"points": [[1, 2], [3, 4], [5, 6]]}))
    (source / "broken.jpg").write_bytes(jpeg_bytes(photos.rocket())[:2000])
    (source / "broken.points").write_text(json.dumps({"points": POINTS}))
    (source / "garbled.jpg").write_bytes(jpeg_bytes(photos.rocket()))
    (source / "garbled.points").write_text("{'points': ")
    (source / "lonely.jpg").write_bytes(jpeg_bytes(photos.rocket()))  # its points have not arrived: left alone

    done = poll(server, folders, "--prediction_tmp", str(folders["tmp"]))
    assert done.returncode == 0, done.stderr
    out, failed = folders["out"], folders["out"] / "failed"
    assert np.array_equal(read_png((out / "astronaut.png").read_bytes()), box_mask((512, 512), POINTS).astype(np.uint8))
    assert np.array_equal(read_png((out / "coffee.png").read_bytes()), box_mask((400, 600), coffee_points) * np.uint8(5))
    opex = ObjectPredictions.from_json_string((out / "coffee.json").read_text())
    assert opex.id == "coffee" and [found.label for found in opex.objects] == ["5"] and json.loads(opex.meta["points"]) == coffee_points
    assert {path.name for path in out.iterdir()} == {"astronaut.jpg", "astronaut.points", "astronaut.png", "astronaut.json",
                                                     "coffee.input.png", "coffee.png", "coffee.points", "coffee.json", "failed"}  # fmt: skip
    assert np.array_equal(read_png((out / "coffee.input.png").read_bytes()), photos.coffee())
    assert {path.name for path in source.iterdir()} == {"lonely.jpg"} and not list(folders["tmp"].iterdir())
    reasons = {path.name.split(".")[0]: path.read_text() for path in failed.glob("*.reason.txt")}
    assert "four [x, y] points" in reasons["three"] and "truncated or corrupt" in reasons["broken"] and "not JSON" in reasons["garbled"]
    assert {path.name for path in failed.iterdir()} >= {"three.jpg", "three.points", "broken.jpg", "broken.points", "garbled.jpg"}


def test_continuous_folder_poll_with_delete_input(server, folders):
    command = [CLIENT, "dextr-poll", "--prediction_in", str(folders["in"]), "--prediction_out", str(folders["out"]), "--continuous",
               "--poll_wait", "0.2", "--delete_input", "--url", server.inference, "--token-file", str(server.workdir / "key_file.json")]  # fmt: skip
    poller = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(1)
        (folders["in"] / "late.jpg").write_bytes(jpeg_bytes(photos.chelsea()))
        (folders["in"] / "late.points").write_text(json.dumps({"points": [[30, 30], [400, 40], [420, 280], [20, 250]]}))
        deadline = time.time() + 300
        while not (folders["out"] / "late.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (folders["out"] / "late.png").exists() and (folders["out"] / "late.json").exists()
        assert not list(folders["in"].iterdir()) and not (folders["out"] / "late.jpg").exists()
    finally:
        os.killpg(poller.pid, signal.SIGTERM)
        assert poller.wait(timeout=60) == 0
