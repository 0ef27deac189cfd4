"""The TorchServe handler driven with a real ts.context.Context (no server): per-request explain and status."""
import json
import sys
from pathlib import Path

import pytest
import torch
from skimage import data as photos
from ts.context import Context, RequestProcessor

from replies import read_reply
from torchserve_harness import jpeg_bytes
from vision_attribution.archives.build import stage_archive
from vision_attribution.networks.lanet import LANET_NET_ENCODING, NetworkCIFAR, decode_lanet_encoding
from vision_attribution.serving.settings import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "handlers"))
from attribution_handler import AttributionHandler  # noqa: E402


def staged_lanet(model_dir: Path, yaml_config: dict) -> None:
    """An extracted lanet archive: weights.pt and archive.json, as archive.sh stages them."""
    model_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    network = NetworkCIFAR(8, 10, 5, False, decode_lanet_encoding(LANET_NET_ENCODING))
    checkpoint = model_dir.parent / f"{model_dir.name}-top1.pt"
    torch.save({"model_state_dict": network.state_dict()}, checkpoint)
    stage_archive("lanet", model_dir, yaml_config, checkpoint, None, False)


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("lanet-model-dir")
    yaml_config = {"attribution": {"n_steps": 5, "max_response_bytes": 10_000_000}, "model": {"idg_grid": 2}}
    staged_lanet(model_dir, yaml_config)
    context = Context("lanet", str(model_dir), {}, 4, None, "0.12.0", model_yaml_config=yaml_config)
    service = AttributionHandler()
    service.initialize(context)
    return service


def batch_context(headers: list[dict]) -> Context:
    context = Context("lanet", "", {}, len(headers), None, "0.12.0")
    context.request_processor = [RequestProcessor(h) for h in headers]
    return context


@pytest.mark.slow
def test_each_request_of_a_mixed_batch_gets_its_own_kind_and_status(handler):
    image = jpeg_bytes(photos.chelsea(), (48, 32))
    data = [{"body": image}, {"body": image}, {"body": b"not an image"}, {"body": image}]
    headers = [{"explain": "True"}, {"explain": "False"}, {"explain": "True"}, {"explain": "False", "Accept": "application/x-npz"}]
    context = batch_context(headers)
    bodies = handler.handle(data, context)
    assert len(bodies) == 4
    explanation = read_reply(bodies[0])
    assert explanation["step_sizes"].shape == (5, 1) and explanation["idg_per_mask"]["idg"].shape == (4,)
    assert context.get_response_content_type(0) == "application/gzip" and context.get_response_status(0)[0] == 200
    assert "top5" in json.loads(bodies[1]) and context.get_response_content_type(1) == "application/json"
    assert context.get_response_status(2)[0] == 400 and "not a valid image" in json.loads(bodies[2])["error"]
    assert context.get_response_content_type(3) == "application/x-npz" and bodies[3][:2] == b"PK"


@pytest.mark.parametrize(
    "yaml_config, message",
    [
        ({"attribution": {"nsteps": 5}}, r"'attribution:' has unknown key\(s\) \['nsteps'\]; allowed keys are \[.*'n_steps'"),
        ({"attribution": {"baseline": "blak"}}, r"'attribution.baseline' must be one of zeros, mean, black, white, blur, uniform, gaussian; got 'blak'"),
        ({"model": {"idg_grid": 0}}, r"'model.idg_grid' must be between 1 and 32, got 0"),
        ({"atribution": {}}, r"unknown top-level key\(s\) \['atribution'\]"),
    ],
)
def test_a_worker_refuses_an_invalid_model_config_naming_the_key(tmp_path, yaml_config, message):
    staged_lanet(tmp_path / "model", {})
    context = Context("lanet", str(tmp_path / "model"), {}, 1, None, "0.12.0", model_yaml_config=yaml_config)
    with pytest.raises(ConfigError, match=message):
        AttributionHandler().initialize(context)
