"""The service's three verbs (decode -> run -> encode) and what each decides once: the options an archive
accepts and their defaults, the quadrature rule spec, the KServe v2 reply size; and the archive builder's
one-line answer where an archive needs more than the serving core (a small random classifier, no server)."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from torchserve_harness import REPO, jpeg_bytes
from vision_attribution.adapters.classifier import ClassifierAdapter
from vision_attribution.attribution.quadrature import ADAPTIVE_MIN_STEPS, RuleSpec
from vision_attribution.formats import kserve_v2
from vision_attribution.serving.jobs import ExplanationJob, ExplanationSpec, IncomingRequest, PathSetSpec, PredictionJob, Protocol, Reply, Result
from vision_attribution.serving.options import OPTIONS, PATH_OPTIONS
from vision_attribution.serving.service import AttributionService
from vision_attribution.serving.settings import AttributionSettings, ConfigError, read_model_config
from vision_attribution.formats.errors import RequestError

CPU = torch.device("cpu")
IMAGE = jpeg_bytes(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy())


@pytest.fixture(scope="module")
def service():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval().requires_grad_(False)
    adapter = ClassifierAdapter(network, ["a", "b", "c", "d"], (16, 16), (0.5,) * 3, (0.25,) * 3, CPU)
    settings, _ = read_model_config({"attribution": {"n_steps": 4, "max_response_bytes": 10_000_000}}, {})
    return AttributionService(adapter, settings)


def test_the_verbs_decode_run_encode_make_the_same_replies_as_the_whole(service):
    requests = [
        IncomingRequest(fields={"body": IMAGE}, explain=True),
        IncomingRequest(fields={"body": IMAGE}, headers={"Accept": "application/x-npz"}),
        IncomingRequest(fields={"body": b"not an image"}, explain=True),
        IncomingRequest(fields={}, explain=True, kserve_v2_inputs=[{"name": "image", "datatype": "UINT8", "shape": [8, 8, 3], "data": [[[9] * 3] * 8] * 8}]),
    ]
    jobs = service.decode(requests)
    assert [type(job) for job in jobs] == [ExplanationJob, PredictionJob, Reply, ExplanationJob]
    assert [getattr(job, "protocol", None) for job in jobs] == [Protocol.NATIVE, Protocol.NATIVE, Protocol.NATIVE, Protocol.KSERVE_V2]
    assert jobs[0].spec == ExplanationSpec(RuleSpec("gausslegendre", 4), PathSetSpec("zeros"), 16, False, None)
    assert jobs[2].status == 400 and "not a valid image" in jobs[2].error
    results = service.run(jobs)
    assert [type(result) for result in results] == [Result, Result, Reply, Result]
    replies = service.encode(results)
    whole = service.handle_batch(requests)
    assert [(reply.status, reply.content_type) for reply in replies] == [(reply.status, reply.content_type) for reply in whole]
    assert replies[1].body == whole[1].body and replies[2].body == whole[2].body
    assert replies[3].body == b"" and [output.name for output in replies[3].outputs][:2] == ["integrated_grads", "integrated_grads.shape"]


def test_a_group_that_fails_is_computed_one_by_one(service, monkeypatch):
    """The fallback exists once, for predictions and explanations alike: only the failing job fails."""
    calls = []
    real_predict = service.adapter.predict

    def predict(inputs, options):
        calls.append(len(inputs))
        if len(inputs) > 1 or options[0].get("target") == "b":
            raise RuntimeError("boom")
        return real_predict(inputs, options)

    monkeypatch.setattr(service.adapter, "predict", predict)
    fields = [{"body": json.dumps({"image": __import__("base64").b64encode(IMAGE).decode(), "target": name}).encode()} for name in "abc"]
    replies = service.handle_batch([IncomingRequest(fields=f) for f in fields])
    assert calls == [3, 1, 1, 1]
    assert [reply.status for reply in replies] == [200, 500, 200]


def test_every_option_is_declared_once_with_its_default_from_the_settings(service):
    settings_fields = {field.name for field in dataclasses.fields(AttributionSettings)}
    assert all(option.default in settings_fields for option in OPTIONS.values() if option.default is not None)
    assert set(PATH_OPTIONS) <= set(OPTIONS)
    for adapter_options in (ClassifierAdapter.options, ("target", "region_reduction", "threshold")):
        assert set(adapter_options) <= set(OPTIONS) and not set(adapter_options) & set(PATH_OPTIONS)
    assert set(service.checks) == set(PATH_OPTIONS) | {"target", "idg_grid"}
    assert {name for name, option in OPTIONS.items() if not option.explanation_only} == {"threshold", "native_resolution", "points", "label", "image_size"}


@pytest.mark.parametrize(
    "options, settings, expected",
    [
        ({}, {}, RuleSpec("gausslegendre", 50)),
        ({}, {"tolerance": 0.02}, RuleSpec(tolerance=0.02, max_steps=257)),
        ({"n_steps": 7}, {"tolerance": 0.02}, RuleSpec("gausslegendre", 7)),
        ({"method": "riemann_left"}, {"tolerance": 0.02}, RuleSpec("riemann_left", 50)),
        ({"tolerance": 0.1, "max_steps": 41}, {}, RuleSpec(tolerance=0.1, max_steps=41)),
        ({"method": "adaptive_trapezoid", "tolerance": 0.1}, {"tolerance_max_steps": 65}, RuleSpec(tolerance=0.1, max_steps=65)),
    ],
)
def test_the_rule_spec_is_resolved_once_from_options_and_settings(options, settings, expected):
    archive_settings, _ = read_model_config({"attribution": settings}, {})
    assert ExplanationSpec.resolve(options, archive_settings, seed_reply=False).rule == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tolerance": 0.1, "n_steps": 5}, "cannot be combined with 'n_steps'"),
        ({"max_steps": 41}, "'max_steps' bounds a tolerance-driven explanation"),
        ({"method": "adaptive_trapezoid"}, "refines until a 'tolerance' is met"),
        ({"method": "riemann_trapezoid", "n_steps": 1}, "option 'n_steps' must be at least 2 for method riemann_trapezoid"),
    ],
)
def test_contradicting_options_are_a_400(options, message):
    with pytest.raises(RequestError, match=message) as caught:
        ExplanationSpec.resolve(options, AttributionSettings(), seed_reply=False)
    assert caught.value.status == 400


def test_the_step_checks_live_in_the_rule_spec():
    with pytest.raises(ValueError, match="at least 2 for method riemann_trapezoid"):
        RuleSpec("riemann_trapezoid", 1)
    with pytest.raises(ValueError, match=f"max_steps must be at least {ADAPTIVE_MIN_STEPS}"):
        RuleSpec(tolerance=0.1, max_steps=ADAPTIVE_MIN_STEPS - 1)
    with pytest.raises(ConfigError, match="'attribution.n_steps' must be at least 2 for method riemann_trapezoid"):
        read_model_config({"attribution": {"method": "riemann_trapezoid", "n_steps": 1}}, {})
    assert RuleSpec(tolerance=0.1, max_steps=99).most_steps == 99 and RuleSpec("riemann_left", 3).most_steps == 3


def test_a_seed_request_keeps_the_path_unless_it_says_otherwise():
    settings = AttributionSettings()
    assert ExplanationSpec.resolve({}, settings, seed_reply=True).keep_path
    assert not ExplanationSpec.resolve({"return_path": False}, settings, seed_reply=True).keep_path
    assert not ExplanationSpec.resolve({}, settings, seed_reply=False).keep_path


def test_the_kserve_reply_size_is_exact_when_it_matters():
    outputs = kserve_v2.outputs_of({"values": torch.linspace(-1, 1, 3000).reshape(30, 100), "names": ["a", "é"], "flag": torch.tensor([True, False])})
    exact = len(json.dumps(kserve_v2.reply_document(outputs), indent=2).encode())
    assert kserve_v2.reply_bytes_over(outputs, exact) is None
    assert kserve_v2.reply_bytes_over(outputs, exact - 1) == exact
    assert kserve_v2.reply_bytes_over(outputs, 10**9) is None
    assert [output.name for output in outputs] == ["values", "values.shape", "names", "flag"]
    assert outputs[1].data.tolist() == [30, 100] and outputs[0].data.dtype.name == "float32"


@pytest.mark.slow
def test_an_archive_that_needs_more_than_the_serving_core_says_what_to_run(tmp_path):
    """swin needs mmdet and mmcv's ops, which only ./setup.sh --all installs: archive.sh says so in one line
    (run here with mmcv hidden, as on a machine set up with ./setup.sh)."""
    code = (
        "import sys; sys.modules['mmcv'] = None; from vision_attribution.archives.build import main; "
        f"sys.exit(main(['swin', '--checkpoint', {str(tmp_path / 'x.pth')!r}, '--handler', 'h.py', '--configs', "
        f"{str(REPO / 'vision_attribution' / 'archives' / 'configs')!r}, '--out', {str(tmp_path)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "run ./setup.sh --all" in done.stderr and "mmcv.ops" in done.stderr
