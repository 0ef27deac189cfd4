"""The TorchServe handler driven with a real ts.context.Context (no server): per-request explain and status."""
import gzip
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from skimage import data as photos
from ts.context import Context, RequestProcessor

from torchserve_harness import jpeg_bytes
from vision_attribution.models.lanet import LANET_NET_ENCODING, NetworkCIFAR, decode_lanet_encoding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handlers"))
from lanet_handler import LanetHandler  # noqa: E402


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("lanet-model-dir")
    torch.manual_seed(0)
    network = NetworkCIFAR(8, 10, 5, False, decode_lanet_encoding(LANET_NET_ENCODING))
    torch.save({"model_state_dict": network.state_dict()}, model_dir / "checkpoint.pth")
    yaml_config = {"attribution": {"n_steps": 5, "max_response_bytes": 10_000_000}, "model": {"idg_grid": 2}}
    context = Context("lanet", str(model_dir), {}, 4, None, "0.12.0", model_yaml_config=yaml_config)
    service = LanetHandler()
    service.initialize(context)
    return service


def batch_context(headers: list[dict]) -> Context:
    context = Context("lanet", "", {}, len(headers), None, "0.12.0")
    context.request_processor = [RequestProcessor(h) for h in headers]
    return context


def test_each_request_of_a_mixed_batch_gets_its_own_kind_and_status(handler):
    image = jpeg_bytes(photos.chelsea(), (48, 32))
    data = [{"body": image}, {"body": image}, {"body": b"not an image"}, {"body": image}]
    headers = [{"explain": "True"}, {"explain": "False"}, {"explain": "True"}, {"explain": "False", "Accept": "application/x-npz"}]
    context = batch_context(headers)
    bodies = handler.handle(data, context)
    assert len(bodies) == 4
    with gzip.open(io.BytesIO(bodies[0])) as stream:
        explanation = torch.load(io.BytesIO(stream.read()))
    assert explanation["step_sizes"].shape == (5, 1) and explanation["idg_per_mask"]["idg"].shape == (4,)
    assert context.get_response_content_type(0) == "application/gzip" and context.get_response_status(0)[0] == 200
    assert "top5" in json.loads(bodies[1]) and context.get_response_content_type(1) == "application/json"
    assert context.get_response_status(2)[0] == 400 and "not a valid image" in json.loads(bodies[2])["error"]
    assert context.get_response_content_type(3) == "application/x-npz" and bodies[3][:2] == b"PK"


def test_unknown_settings_in_model_config_are_refused(tmp_path):
    torch.save({"model_state_dict": NetworkCIFAR(8, 10, 5, False, decode_lanet_encoding(LANET_NET_ENCODING)).state_dict()}, tmp_path / "checkpoint.pth")
    context = Context("lanet", str(tmp_path), {}, 1, None, "0.12.0", model_yaml_config={"attribution": {"nsteps": 5}})
    with pytest.raises(ValueError, match="unknown handler settings"):
        LanetHandler().initialize(context)
