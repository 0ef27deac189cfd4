"""Defects found when the project was tried as a new user would; each test here failed before its fix.

Archives are staged exactly as archive.sh stages them (vision_attribution.archives.build) and served through
the same service a TorchServe worker runs; test_reliability.py repeats the user's path against a real TorchServe.
"""
import dataclasses
import gzip
import io
import json
import logging
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as photos

from checkpoint_files import png16, write_bit_checkpoint, write_deeplab_checkpoint, write_lanet_checkpoint, write_swin_fork_checkpoint, write_tensormask_checkpoint
from dextr_data import write_pickled_dextr_model
from framework_configs import SMALL_SWIN_CONFIG
from replies import read_reply
from torchserve_harness import REPO, jpeg_bytes, shipped_model_config
from vision_attribution.serving import service as service_module
from vision_attribution.archives import load_service
from vision_attribution.archives.build import stage_archive
from vision_attribution.clients.cli import load_reply
from vision_attribution.formats.decode import decode_image_bytes
from vision_attribution.serving.jobs import IncomingRequest

CHECKPOINT_WRITERS = {"lanet": write_lanet_checkpoint, "bit": write_bit_checkpoint, "tensormask": write_tensormask_checkpoint}
USER_FILE_NAMES = {"lanet": "top1.pt", "bit": "BiT-S-R101x3.pth.tar", "tensormask": "model_final.pth"}
STEPS = {"swin": 1, "dextr": 1, "deeplab": 1}  # path steps of the round-trip explanations: one for the slow networks
DEXTR_POINTS = [[20, 10], [80, 35], [45, 5], [40, 68]]  # four extreme points [x, y] inside the 96x72 photo


def archive_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "archive.sh"), *map(str, args)], capture_output=True, text=True, timeout=600)


def service_of_mar(mar: Path, workdir: Path):
    """Extract a .mar and load its service as a TorchServe worker does (its model-config from the manifest)."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(workdir)
    manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
    model_config = yaml.safe_load((workdir / manifest["model"]["configFile"]).read_text())
    return load_service(workdir, model_config, torch.device("cpu"))


# 1. Checkpoint file names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", ["lanet", "bit", "tensormask"])
def test_archive_sh_builds_from_the_users_checkpoint_file_name_and_the_worker_loads_it(tmp_path, archive):
    checkpoint = CHECKPOINT_WRITERS[archive](tmp_path / USER_FILE_NAMES[archive])
    done = archive_sh(archive, "--checkpoint", checkpoint, "--out", tmp_path / "store")
    assert done.returncode == 0, done.stderr
    service = service_of_mar(tmp_path / "store" / f"{archive}.mar", tmp_path / "worker")
    fields = {"body": jpeg_bytes(photos.coffee(), (64, 48))}
    if archive == "tensormask":
        fields["native_resolution"] = "true"
    (reply,) = service.handle_batch([IncomingRequest(fields=fields)])
    assert reply.status == 200, reply.body


def test_a_model_zoo_pickle_under_any_name_builds(tmp_path):
    checkpoint = write_tensormask_checkpoint(tmp_path / "model_final_2b3a7b.weights", model_zoo_pickle=True)
    done = archive_sh("tensormask", "--checkpoint", checkpoint, "--out", tmp_path / "store")
    assert done.returncode == 0, done.stderr


def lanet_missing_a_key(path: Path) -> Path:
    write_lanet_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_state_dict"]["cells.3.preprocess1.op.1.weight"]
    torch.save(checkpoint, path)
    return path


def a_photo_named_as_a_checkpoint(path: Path) -> Path:
    path.write_bytes(jpeg_bytes(photos.coffee()))
    return path


@pytest.mark.parametrize(
    "archive, writer, message",
    [
        ("lanet", write_bit_checkpoint, "LaNet checkpoint is not a state dict: ['model', 'optim', 'step'] are not tensors"),
        ("lanet", lanet_missing_a_key, "missing keys ['cells.3.preprocess1.op.1.weight']"),
        ("bit", a_photo_named_as_a_checkpoint, "neither a PyTorch checkpoint"),
        ("tensormask", write_lanet_checkpoint, "model parameters missing from the checkpoint"),
    ],
    ids=["wrong layout", "missing key", "not a checkpoint", "another model"],
)
def test_archive_sh_refuses_a_checkpoint_that_cannot_be_loaded_with_the_loaders_message(tmp_path, archive, writer, message):
    checkpoint = writer(tmp_path / "weights.pth")
    done = archive_sh(archive, "--checkpoint", checkpoint, "--out", tmp_path / "store")
    assert done.returncode == 2
    assert message in done.stderr and str(checkpoint) in done.stderr
    assert not (tmp_path / "store" / f"{archive}.mar").exists()


# 5. Archive configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attribution": {"baseline": "blak"}}, "'attribution.baseline' must be one of zeros, mean, black, white, blur, uniform, gaussian; got 'blak'"),
        ({"attribution": {"n_steps": 0}}, "'attribution.n_steps' must be between 1 and"),
        ({"attribution": {"method": "simpson"}}, "'attribution.method' must be one of gausslegendre, riemann_left"),
        ({"model": {"idg_grid": "four"}}, "'model.idg_grid' must be an integer, got 'four'"),
        ({"model": {"grid": 4}}, "'model:' has unknown key(s) ['grid']; allowed keys are ['idg_grid']"),
    ],
)
def test_archive_sh_refuses_an_invalid_model_config_naming_the_key_and_the_allowed_values(tmp_path, change, message):
    config = shipped_model_config("effnet")
    for section, values in change.items():
        config[section].update(values)
    (tmp_path / "effnet.yaml").write_text(yaml.safe_dump(config))
    done = archive_sh("effnet", "--model-config", tmp_path / "effnet.yaml", "--out", tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr


# Services of every archive, staged as archive.sh stages them ----------------------------------------------------


class StagedServices(dict):
    """Each archive's service, staged as archive.sh stages it the first time a test asks for it (so that a test of
    one archive does not pay for staging the others)."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, archive: str):
        workdir = self.tmp_path_factory.mktemp(f"{archive}-staged")
        config = shipped_model_config(archive)
        config["attribution"]["max_response_bytes"] = 60_000_000
        checkpoint, framework_config, trust = None, None, False
        if archive in CHECKPOINT_WRITERS:
            checkpoint = CHECKPOINT_WRITERS[archive](workdir.parent / f"{workdir.name}-{USER_FILE_NAMES[archive]}")
        elif archive == "swin":  # the seed fork's layout; a config at 192x128 with fewer proposals keeps it fast
            checkpoint = write_swin_fork_checkpoint(workdir.parent / f"{workdir.name}-cascade_mask_rcnn_swin_tiny_patch4_window7.pth")
            framework_config = workdir.parent / f"{workdir.name}-swin_small.py"
            framework_config.write_text(SMALL_SWIN_CONFIG)
        elif archive == "dextr":  # the published format (a pickled DextrModel, random weights) with 64x64 crops
            checkpoint = write_pickled_dextr_model(workdir.parent / f"{workdir.name}-dextr_pascalvoc_resunet101.pth", size=64, padding=4, sigma=4.0)
            trust = True
        elif archive == "deeplab":
            checkpoint = write_deeplab_checkpoint(self.tmp_path_factory.mktemp("deeplab-checkpoint"), "mobile")
        stage_archive(archive, workdir, config, checkpoint, framework_config, trust)
        self[archive] = load_service(workdir, config, torch.device("cpu"))
        return self[archive]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    return StagedServices(tmp_path_factory)


def serve(service, fields: dict, explain: bool = False, accept: str | None = None):
    (reply,) = service.handle_batch([IncomingRequest(fields=fields, headers={"Accept": accept} if accept else {}, explain=explain)])
    return reply


def photo_fields(archive: str, **options) -> dict:
    fields = {"body": jpeg_bytes(photos.astronaut(), (96, 72)), **{key: str(value) for key, value in options.items()}}
    if archive == "tensormask":
        fields.update(native_resolution="true", threshold="0.3")
    elif archive == "swin":
        fields.update(threshold="0.05")
    elif archive == "dextr":
        fields.update(points=json.dumps(DEXTR_POINTS))
    elif archive == "deeplab":
        fields.update(image_size="64")
    return fields


def read_plainly(body: bytes, content_type: str):
    """The reply read with plain tools only: gzip + torch.load(weights_only=True), np.load without pickle, json, PIL."""
    if content_type == "application/gzip":
        return torch.load(io.BytesIO(gzip.decompress(body)), weights_only=True)
    if content_type == "application/x-npz":
        arrays = np.load(io.BytesIO(body), allow_pickle=False)
        return {name: arrays[name] for name in arrays.files}
    if content_type == "application/json":
        return json.loads(body)
    assert content_type == "image/png"
    return np.asarray(Image.open(io.BytesIO(body)))


REPLY_TYPES = ("application/gzip", "application/x-npz", "application/json")


# 2. Every reply type of every archive reads back -------------------------------------------------------------


@pytest.mark.parametrize("archive", ["effnet", "selfie", "bit", "lanet", "tensormask", "swin", "dextr", "deeplab"])
def test_every_reply_type_reads_back_with_plain_readers_and_the_client(services, archive, tmp_path):
    service = services[archive]
    kinds = [(False, accept) for accept in (*REPLY_TYPES, "image/png") if accept.split("/")[1].replace("x-", "") in service.adapter.prediction_types]
    kinds += [(True, accept) for accept in REPLY_TYPES]
    integrated = []
    for explain, accept in kinds:
        options = {"n_steps": STEPS.get(archive, 2), "internal_batch_size": 2, "return_path": "true"} if explain else {}
        reply = serve(service, photo_fields(archive, **options), explain=explain, accept=accept)
        assert reply.status == 200, reply.body
        assert reply.content_type == accept
        plain = read_plainly(reply.body, accept)
        if accept == "image/png":
            assert plain.dtype == np.uint8 and plain.shape == (72, 96)
            continue
        (tmp_path / "reply").write_bytes(reply.body)
        via_client = load_reply(tmp_path / "reply")
        assert set(via_client) == {name.split("/")[0] for name in plain}
        if explain:
            integrated.append(np.asarray(plain["integrated_grads"], dtype=np.float32))
    # The same numbers whatever the encoding, up to the float32 noise of the computation itself: each reply type is its
    # own request, and on CI's CPU deeplab's forward + backward differed between two runs by 4e-6 of the largest value
    # (a lossy encoding, float16 say, would differ by 1e-3).
    for values in integrated[1:]:
        np.testing.assert_allclose(values, integrated[0], rtol=0, atol=2e-5 * float(np.abs(integrated[0]).max()))


PATH_METHODS = [
    ({"baseline": "uniform", "baselines": 2, "idg_hierarchy": 6}, "expected_gradients"),
    ({"noise_samples": 2, "baseline": "white", "tolerance": 0.5, "max_steps": 21}, "smoothgrad"),
    ({"attribution_method": "blur_ig", "max_sigma": 6}, "blur_ig"),
    ({"attribution_method": "guided_ig", "baseline": "blur"}, "guided_ig"),
    ({"xrai": "true", "baseline": "mean"}, "integrated_gradients"),
]


@pytest.mark.parametrize("archive", ["effnet", "selfie", "bit", "lanet", "tensormask", "swin", "dextr", "deeplab"])
def test_every_archive_explains_with_every_path_method(services, archive):
    """Classifiers, semantic segmenters, instance detectors and dextr take the same path options, and each reply
    says how it was made and adds up: convergence_delta = F(x) - F(x') - sum(IG), over several paths as means; the
    IDG hierarchy comes with expected gradients, and a tolerance applies to each of SmoothGrad's paths."""
    service = services[archive]
    for options, method in PATH_METHODS:
        if "tolerance" in options and archive in STEPS:
            continue  # a tolerance takes at least 21 steps a path: not on the slow networks
        steps = {} if "tolerance" in options else {"n_steps": STEPS.get(archive, 2)}
        reply = serve(service, photo_fields(archive, return_path="false", **steps, **options), explain=True)
        assert reply.status == 200, (options, reply.body)
        document = read_reply(reply.body)
        assert document["attribution"]["method"] == method, document["attribution"]
        change = document["target_at_input"] - document["target_at_baseline"]
        total = float(document["integrated_grads"].double().sum())
        assert document["convergence_delta"] == pytest.approx(change - total, abs=1e-4 * max(1.0, abs(change), abs(total))), options
        if "xrai" in options:
            assert int(document["xrai"]["ranks"].max()) == len(document["xrai"]["gains"])
        if "idg_hierarchy" in options:
            tree = document["idg_hierarchy"]
            assert float(tree["dividend"].sum()) == pytest.approx(1.0) and float(tree["value"][0]) == pytest.approx(1.0)
        if "tolerance" in options:
            assert document["refinement"]["max_steps"] == 21 and len(document["paths"]) == 2


# 3, 4. Oversize replies: refused before any work, with hints a seed client can use; return_path honoured --------


def test_an_oversize_explanation_is_refused_before_any_gradient_is_computed(services, monkeypatch):
    def no_integration(*args, **kwargs):
        raise AssertionError("the engine ran although the reply could not be sent")

    monkeypatch.setattr(service_module, "integrate_paths", no_integration)
    service = services["lanet"]
    monkeypatch.setattr(service, "settings", dataclasses.replace(service.settings, max_response_bytes=20_000_000))
    request = {"img_data": np.asarray(photos.coffee()[::16, ::16]).tolist(), "target_class": "cat", "n_steps": 1000}
    reply = serve(service, {"body": json.dumps(request).encode()}, explain=True)
    assert reply.status == 413
    error = json.loads(reply.body)["error"]
    assert '"return_path": false drops the seed reply\'s integrated_directional_grads and intermediates' in error
    assert "n_steps=" in error and "or fewer fits" in error


def test_a_seed_request_may_drop_the_path_tensors_and_a_native_one_may_ask_for_them(services):
    pixels = np.asarray(photos.coffee()[::16, ::16]).tolist()
    without = serve(services["bit"], {"body": json.dumps({"img_data": pixels, "target_class": "cat", "return_path": False}).encode()}, explain=True)
    assert without.status == 200
    assert set(read_reply(without.body)) == {"integrated_grads", "step_sizes", "output", "target_class"}
    native = serve(services["effnet"], photo_fields("effnet", n_steps=3, return_path="true"), explain=True)
    assert read_reply(native.body)["integrated_directional_grads"].shape == (3, 3, 224, 224)


# 6. Internal errors: a generic 500 with a request id; the rest of the predict batch is served ----------------


def test_an_internal_error_is_logged_under_a_request_id_and_fails_only_its_own_request(services, monkeypatch, caplog):
    service = services["lanet"]
    predict = service.adapter.predict

    def predict_failing_on_narrow_images(inputs, options):
        if any(item.image.shape[1] == 13 for item in inputs):
            raise RuntimeError("secret internal detail")
        return predict(inputs, options)

    monkeypatch.setattr(service.adapter, "predict", predict_failing_on_narrow_images)
    requests = [IncomingRequest(fields={"body": jpeg_bytes(photos.coffee(), size)}, request_id=f"id-{index}") for index, size in enumerate([(40, 30), (13, 30), (50, 20)])]
    with caplog.at_level(logging.ERROR):
        replies = service.handle_batch(requests)
    assert [reply.status for reply in replies] == [200, 500, 200]
    error = json.loads(replies[1].body)
    assert error["request_id"] == "id-1" and "secret" not in replies[1].body.decode()
    logged = [record for record in caplog.records if "id-1" in record.getMessage()]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])


def test_cpu_allocator_failures_are_507(services, monkeypatch):
    service = services["lanet"]

    def out_of_memory(inputs, options):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 13958643712 bytes.")

    monkeypatch.setattr(service.adapter, "predict", out_of_memory)
    reply = serve(service, {"body": jpeg_bytes(photos.coffee(), (40, 30))})
    assert reply.status == 507 and "out of memory" in json.loads(reply.body)["error"]


# 8. target_class for segmenters, as the README says -----------------------------------------------------------


def test_segmenters_accept_target_class_as_the_classifiers_do(services):
    reply = serve(services["selfie"], photo_fields("selfie", n_steps=2, target_class="person"), explain=True)
    assert reply.status == 200, reply.body
    assert read_reply(reply.body)["target"]["name"] == "person"


# 11. Deeply nested JSON --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[" * 10_000, b'{"img_data": ' + b"[" * 10_000, b'{"img_data": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}"])
def test_deeply_nested_json_is_a_400(services, body):
    reply = serve(services["lanet"], {"body": body}, explain=True)
    assert reply.status == 400, reply.body
    assert "nested" in json.loads(reply.body)["error"] or "nesting" in json.loads(reply.body)["error"]


# 12. High bit depths are scaled, not clipped -------------------------------------------------------------------------


def coffee_grey() -> np.ndarray:
    return np.asarray(Image.fromarray(photos.coffee()).convert("L"))


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "encoded",
    [
        lambda grey: png16(grey.astype(np.uint16) * 257),
        lambda grey: tiff_bytes(grey.astype(np.uint16) * 257),
        lambda grey: tiff_bytes(grey.astype(np.int32) * 8421504),  # 32-bit: 255 * 8421504 = 2**31 - 2**23 ~ full scale
        lambda grey: tiff_bytes(grey.astype(np.float32) / 255),
    ],
    ids=["16-bit PNG", "16-bit TIFF", "32-bit integer TIFF", "32-bit float TIFF"],
)
def test_high_bit_depth_images_are_scaled_to_8_bits(encoded):
    grey = coffee_grey()
    decoded = decode_image_bytes(encoded(grey))
    assert np.abs(decoded[..., 0].astype(int) - grey).max() <= 1
    assert (decoded[..., 0] == decoded[..., 1]).all()


def test_a_16_bit_png_of_coffee_is_classified_as_its_8_bit_version(services):
    grey = coffee_grey()
    as_8_bit = serve(services["effnet"], {"body": tiff_bytes(grey)})
    as_16_bit = serve(services["effnet"], {"body": png16(grey.astype(np.uint16) * 257)})
    assert json.loads(as_16_bit.body)["predicted_name"] == json.loads(as_8_bit.body)["predicted_name"] == "espresso"
    rgb_16_bit = serve(services["effnet"], {"body": png16(photos.coffee().astype(np.uint16) * 257)})
    assert json.loads(rgb_16_bit.body)["predicted_name"] == "espresso"


def test_float_images_outside_0_1_are_refused(services):
    reply = serve(services["effnet"], {"body": tiff_bytes(coffee_grey().astype(np.float32))})
    assert reply.status == 400 and "[0, 1]" in json.loads(reply.body)["error"]
