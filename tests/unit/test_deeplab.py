"""The deeplab archive at archive time: torchvision's checkpoint layouts (mobile and full), strict loading and
its refusals, MAX's IMAGE_SIZE and its fallback, MAX's resize arithmetic."""
import contextlib
import io
import json
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import yaml

from checkpoint_files import DEEPLAB_FILE_NAMES, deeplab_torchvision, write_deeplab_checkpoint
from torchserve_harness import ARCHIVE_CONFIGS, REPO
from vision_attribution.adapters.longest_side import longest_side_size
from vision_attribution.archives import build
from vision_attribution.archives.deeplab import image_size_setting
from vision_attribution.networks.deeplab import load_deeplab


@pytest.fixture(scope="module")
def mobile_checkpoint(tmp_path_factory):
    return write_deeplab_checkpoint(tmp_path_factory.mktemp("deeplab"), "mobile")


def archive(*options: str) -> subprocess.CompletedProcess:
    """What `./archive.sh deeplab OPTIONS` runs (its Python entry point, in this process to save start-up time)."""
    command = ["deeplab", "--handler", str(REPO / "handlers" / "attribution_handler.py"), "--configs", str(ARCHIVE_CONFIGS), *options]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = build.main(command)
    return subprocess.CompletedProcess(command, status, "", stderr.getvalue())


def shipped_settings(mar) -> dict:
    """The `model:` section of the model-config inside a .mar, as a worker reads it."""
    with zipfile.ZipFile(mar) as packed:
        manifest = json.loads(packed.read("MAR-INF/MANIFEST.json"))
        return yaml.safe_load(packed.read(manifest["model"]["configFile"]))["model"]


@pytest.mark.slow
def test_full_model_from_torchvision_file(tmp_path):
    """deeplabv3_resnet101's published layout (with aux_classifier) stages as --model-type full (checked, converted
    and loaded as a worker loads it; packaging 216 MB is left out to save time): the weights kept have no auxiliary
    head, and the model predicts as torchvision's own."""
    checkpoint = write_deeplab_checkpoint(tmp_path, "full")
    config = {**yaml.safe_load((ARCHIVE_CONFIGS / "deeplab.yaml").read_text())}
    config["model"] = {**config["model"], "model_type": "full"}
    (tmp_path / "stage").mkdir()
    build.stage_archive("deeplab", tmp_path / "stage", config, checkpoint, None, False)
    weights = torch.load(tmp_path / "stage" / "weights.pt", weights_only=True)
    assert "backbone.layer3.22.conv3.weight" in weights and not any(key.startswith("aux_classifier.") for key in weights)
    served = load_deeplab(tmp_path / "stage" / "weights.pt", "full")
    reference = deeplab_torchvision("full", calibrate=False)
    reference.load_state_dict(torch.load(checkpoint, weights_only=True))
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(served(image), reference(image)["out"], atol=1e-5)


def test_mobile_without_aux_classifier_and_image_size(tmp_path):
    """A checkpoint trained without aux_loss (no aux_classifier keys) is torchvision's other exact layout;
    --image-size goes into the archive's model-config."""
    checkpoint = tmp_path / "my_deeplab_finetune.pt"
    torch.save(deeplab_torchvision("mobile", aux_classifier=False, calibrate=False).state_dict(), checkpoint)
    done = archive("--checkpoint", str(checkpoint), "--image-size", "333", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert shipped_settings(tmp_path / "deeplab.mar") == {"model_type": "mobile", "image_size": 333}


@pytest.mark.parametrize("image_size, warning", [("2000", "not in range 16 to 1024"), ("abc", "not a positive integer")])
def test_invalid_image_size_falls_back_to_513_with_a_warning(mobile_checkpoint, tmp_path, caplog, image_size, warning):
    """MAX's IMAGE_SIZE rule, kept: other values fall back to 513 and say so (at archive time and in each worker)."""
    done = archive("--checkpoint", str(mobile_checkpoint), "--image-size", image_size, "--out", str(tmp_path))
    assert done.returncode == 0 and warning in caplog.text and "using the default image size of 513" in caplog.text
    assert image_size_setting(shipped_settings(tmp_path / "deeplab.mar")["image_size"]) == 513


@pytest.mark.parametrize(
    "make, options, message",
    [
        ("mobile", ["--model-type", "full"], "this is a deeplabv3_mobilenet_v3_large checkpoint, not deeplabv3_resnet101: use --model-type mobile"),
        ("missing", [], "missing keys ['classifier.4.weight'"),
        ("classes", [], "size mismatch for classifier.4.weight"),
        ("text", [], "is neither a PyTorch checkpoint"),
        ("none", [], "deeplab needs --checkpoint FILE"),
        ("mobile", ["--model-type", "large"], "'model.model_type' must be one of mobile, full; got 'large'"),
        ("mobile", ["--idg-grid", "4"], "deeplab has no setting --idg-grid"),
    ],
)
def test_checkpoints_and_settings_that_cannot_be_served_are_refused(mobile_checkpoint, tmp_path, make, options, message):
    state = torch.load(mobile_checkpoint, weights_only=True)
    checkpoint = tmp_path / DEEPLAB_FILE_NAMES["mobile"]
    if make == "mobile":
        checkpoint = mobile_checkpoint
    elif make == "missing":
        torch.save({key: value for key, value in state.items() if key != "classifier.4.weight"}, checkpoint)
    elif make == "classes":  # a COCO-91 head instead of VOC's 21 classes
        torch.save({**state, "classifier.4.weight": torch.zeros(91, 256, 1, 1), "classifier.4.bias": torch.zeros(91)}, checkpoint)
    elif make == "text":
        checkpoint.write_text("not weights")
    done = archive(*(["--checkpoint", str(checkpoint)] if make != "none" else []), *options, "--out", str(tmp_path / "store"))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "store" / "deeplab.mar").exists()


def test_max_resize_arithmetic():
    """MAX: ratio = IMAGE_SIZE / longest side, each side int()-truncated; a side never drops below 1 pixel."""
    assert longest_side_size(600, 400, 513) == (513, 342)
    assert longest_side_size(400, 600, 513) == (342, 513)
    assert longest_side_size(512, 256, 513) == (513, 256)  # MAX's test photo: [513, 256.5] truncated
    assert longest_side_size(2000, 3, 513) == (513, 1) and longest_side_size(3, 5000, 16) == (1, 16)
    sides = np.random.default_rng(0).integers(1, 5000, size=(200, 2))
    for width, height in sides.tolist():
        ratio = 1.0 * 513 / max(width, height)
        assert longest_side_size(width, height, 513) == (max(1, int(ratio * width)), max(1, int(ratio * height)))
