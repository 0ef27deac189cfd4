"""Region targets and IDG per predicted mask for semantic segmenters, on a tiny model."""
import numpy as np
import pytest
import torch

from vision_attribution.attribution.engine import integrate_path
from vision_attribution.formats.errors import RequestError
from vision_attribution.adapters.semantic import SemanticSegmenterAdapter

CLASSES = ("background", "cat", "dog")


def tiny_segmenter(absent_class: int | None = None):
    """A 2-layer conv segmenter over CLASSES; `absent_class` gets a bias of -100 so that it is never predicted."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(6, 3, 3, padding=1)).double()
    if absent_class is not None:
        net[2].bias.data[absent_class] -= 100
    net = net.eval().requires_grad_(False)
    return SemanticSegmenterAdapter(lambda x: net(x.double()), CLASSES, (12, 12), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))


def image(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(20, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_region_target_gradient_matches_finite_differences(reduction):
    adapter = tiny_segmenter()
    model_input = adapter.prepare(image(), {})
    model_input.tensor = model_input.tensor.double()
    plan = adapter.plan_explanation(model_input, {"region_reduction": reduction})
    region = adapter.class_map(adapter.logits_of(model_input.tensor), 0.5)[0] == plan.target["index"]
    assert plan.target["pixels"] == int(region.sum()) > 0
    expected = adapter.logits_of(model_input.tensor)[0, plan.target["index"]][region].sum()
    if reduction == "mean":
        expected = expected / region.sum()
    assert float(plan.path_target(model_input.tensor)) == pytest.approx(float(expected))
    point = model_input.tensor.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(plan.path_target(point).sum(), point)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        direction = torch.randn(point.shape, generator=generator, dtype=torch.float64)
        step = 1e-6
        numeric = (plan.path_target(model_input.tensor + step * direction) - plan.path_target(model_input.tensor - step * direction)) / (2 * step)
        assert float((gradient * direction).sum()) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)


def test_default_target_is_the_largest_foreground_region_and_groups_are_the_predicted_segments():
    adapter = tiny_segmenter()
    model_input = adapter.prepare(image(), {})
    classes = adapter.class_map(adapter.logits_of(model_input.tensor.double()), 0.5)[0]
    plan = adapter.plan_explanation(model_input, {})
    counts = {c: int((classes == c).sum()) for c in (1, 2)}
    assert plan.target["index"] == max(counts, key=counts.get)
    assert plan.group_labels == [CLASSES[c] for c in classes.unique().tolist()]
    assert torch.equal(plan.groups.sum(0), torch.ones(12, 12, dtype=torch.long))  # the segments tile the input


def test_idg_per_mask_equals_an_independent_computation_and_dividends_sum_to_one():
    adapter = tiny_segmenter()
    model_input = adapter.prepare(image(2), {})
    model_input.tensor = model_input.tensor.double()
    plan = adapter.plan_explanation(model_input, {})
    baseline = adapter.value_scale.to_model(torch.zeros_like(model_input.tensor))  # black
    result = integrate_path(plan.path_target, model_input.tensor, baseline, n_steps=12, groups=plan.groups, keep_path=True)
    difference = model_input.tensor - baseline
    for index, mask in enumerate(plan.groups):
        z = difference[0] * mask
        expected = sum(float(w) * float((g.double() * z / z.norm()).sum()) for w, g in zip(result.step_sizes, result.path_gradients))
        assert float(result.idg[index]) == pytest.approx(expected, rel=1e-5)
    assert float(result.idg_dividends.sum()) == pytest.approx(1.0)


def test_unknown_or_absent_class_is_a_client_error():
    adapter = tiny_segmenter(absent_class=2)
    model_input = adapter.prepare(image(), {})
    with pytest.raises(RequestError, match="unknown class"):
        adapter.plan_explanation(model_input, {"target": "horse"})
    with pytest.raises(RequestError, match="out of range"):
        adapter.plan_explanation(model_input, {"target": 7})
    classes = adapter.class_map(adapter.logits_of(model_input.tensor.double()), 0.5)[0]
    assert not (classes == 2).any() and (classes == 1).any()
    with pytest.raises(RequestError, match="not predicted anywhere"):
        adapter.plan_explanation(model_input, {"target": "dog"})


def test_predictions_are_masks_at_the_original_size_largest_first():
    adapter = tiny_segmenter()
    model_input = adapter.prepare(image(), {})
    (prediction,) = adapter.predict([model_input], [{}])
    masks = prediction["pred_masks"]
    assert masks.dtype == torch.bool and masks.shape[1:] == (20, 16)
    sizes = masks.flatten(1).sum(1).tolist()
    assert sizes == sorted(sizes, reverse=True)
    assert prediction["labels"] == [CLASSES[c] for c in prediction["pred_classes"].tolist()]
    label_image = adapter.prediction_png(prediction)
    for mask, label in zip(masks, prediction["pred_classes"].tolist()):
        assert (label_image[mask.numpy()] == label).all()
