"""IDG over image -> segments -> superpixels, checked against the paper's definitions from the raw path gradients."""
import io
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from skimage import data, transform

import vision_attribution.attribution.idg_hierarchy as idg_hierarchy
from replies import read_reply
from vision_attribution.formats.encode import encode_gzip_torch, encode_json, encode_npz
from vision_attribution.attribution.engine import integrate_path
from vision_attribution.attribution.idg_hierarchy import segment_hierarchy, superpixel_image_of
from vision_attribution.clients.render import render_reply, save_render

SIZE = 64


def dyadic_relu_net() -> torch.nn.Module:
    """A float64 ReLU CNN whose weights are multiples of 1/8: its input gradients are exact in float32."""
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3),
    ).double()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randint(-4, 5, parameter.shape, generator=generator) / 8)
    return net.eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The astronaut, (SIZE, SIZE, 3) float64 in [0, 1]."""
    return transform.resize(data.astronaut(), (SIZE, SIZE), anti_aliasing=True)


@pytest.fixture(scope="module")
def path(photo):
    """(inputs, baseline, PathIntegral with path gradients) for logit 1 of the dyadic net."""
    inputs = (torch.from_numpy(photo).permute(2, 0, 1)[None] - 0.5) / 0.25
    baseline = torch.full_like(inputs, -0.5)
    net = dyadic_relu_net()
    result = integrate_path(lambda points: net(points)[:, 1], inputs, baseline, n_steps=8, keep_path=True)
    return inputs, baseline, result


def overlapping_segments() -> tuple[torch.Tensor, list[str]]:
    """(4, SIZE, SIZE): two overlapping boxes, one hidden under the first, one small; the corner stays uncovered."""
    segments = torch.zeros(4, SIZE, SIZE, dtype=torch.bool)
    segments[0, 4:40, 4:40] = True
    segments[1, 20:60, 20:60] = True
    segments[2, 10:20, 10:20] = True
    segments[3, 0:3, 60:64] = True
    return segments, ["person", "car", "hidden", "tiny"]


def children_of(parent: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(parent == node) for node in range(len(parent))]


def node_masks(hierarchy: dict) -> np.ndarray:
    """(N, h, w) boolean: each node's pixels, the union of the leaves below it."""
    parent, label_map = hierarchy["parent"].numpy(), hierarchy["label_map"].numpy()
    children = children_of(parent)

    def leaves(node: int) -> list[int]:
        return [node] if len(children[node]) == 0 else [leaf for child in children[node] for leaf in leaves(child)]

    return np.stack([np.isin(label_map, leaves(node)) for node in range(len(parent))])


def paper_idg_dividend_value(path_gradients, step_sizes, difference, masks, parent):
    """IDG(S) = sum_k w_k <g_k, z_S / |z_S|>, d(S) = |IDG(S)| / sum_T |IDG(T)|, v(S) = d(S) + sum of v(children)."""
    gradients, weights = path_gradients.double().numpy(), step_sizes.double().numpy()
    difference = difference[0].double().numpy()
    idg = []
    for mask in masks:
        z = difference * mask
        norm = np.sqrt((z**2).sum())
        idg.append(sum(w * (g * z).sum() / norm for w, g in zip(weights, gradients)) if norm > 0 else 0.0)
    idg = np.array(idg)
    dividend = np.abs(idg) / np.abs(idg).sum()
    children = children_of(parent)

    def value(node: int) -> float:
        return dividend[node] + sum(value(child) for child in children[node])

    return idg, dividend, np.array([value(node) for node in range(len(parent))])


@pytest.mark.parametrize("with_segments", [True, False])
def test_matches_paper_definitions(path, photo, with_segments):
    inputs, baseline, result = path
    assert not torch.equal(result.path_gradients[0], result.path_gradients[-1])
    segments, labels = overlapping_segments() if with_segments else (None, [])
    hierarchy = segment_hierarchy(result.integrated_grads, inputs - baseline, segments, labels, photo, 24)
    parent = hierarchy["parent"].numpy()
    idg, dividend, value = paper_idg_dividend_value(result.path_gradients, result.step_sizes, inputs - baseline, node_masks(hierarchy), parent)
    assert hierarchy["depth"].max() == (2 if with_segments else 1)
    for key, expected in (("idg", idg), ("dividend", dividend), ("value", value)):
        assert hierarchy[key].dtype == torch.float64
        np.testing.assert_allclose(hierarchy[key].numpy(), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    assert hierarchy["value"][0].item() == pytest.approx(1.0, abs=1e-12)


def test_partition(path, photo):
    inputs, baseline, result = path
    segments, labels = overlapping_segments()
    hierarchy = segment_hierarchy(result.integrated_grads, inputs - baseline, segments, labels, photo, 24)
    parent, depth, pixels = (hierarchy[key].numpy() for key in ("parent", "depth", "pixels"))
    label_map, children = hierarchy["label_map"].numpy(), children_of(parent)
    leaves = [node for node in range(len(parent)) if len(children[node]) == 0]
    assert label_map.dtype == np.int32 and label_map.shape == (SIZE, SIZE)
    assert set(np.unique(label_map)) == set(leaves)
    assert parent[0] == -1 and depth[0] == 0 and np.all(parent[1:] < np.arange(1, len(parent)))
    assert np.all(np.diff(depth) >= 0) and np.all(depth[1:] == depth[parent[1:]] + 1)
    assert pixels[0] == SIZE * SIZE
    for node in range(len(parent)):
        expected = pixels[children[node]].sum() if len(children[node]) else (label_map == node).sum()
        assert pixels[node] == expected

    segment_nodes = np.flatnonzero(depth == 1)
    assert [hierarchy["labels"][node] for node in segment_nodes] == ["person", "car", "tiny", "rest"]
    masks = node_masks(hierarchy)
    first_owner = segments.numpy().copy()
    for index in range(1, len(first_owner)):
        first_owner[index] &= ~segments.numpy()[:index].any(0)
    expected_regions = [first_owner[0], first_owner[1], first_owner[3], ~segments.numpy().any(0)]
    for node, region in zip(segment_nodes, expected_regions):
        np.testing.assert_array_equal(masks[node], region)
    tiny = segment_nodes[2]
    assert len(children[tiny]) == 0
    assert all(len(children[node]) > 1 for node in segment_nodes[[0, 1, 3]])
    for node in np.flatnonzero(depth == 2):
        label = hierarchy["labels"][node]
        assert label.startswith(hierarchy["labels"][parent[node]] + " superpixel ")


def test_rest_only_when_uncovered_and_single_superpixel_level(path, photo):
    inputs, baseline, result = path
    difference = inputs - baseline
    halves = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    halves[0, :, : SIZE // 2] = True
    halves[1] = True
    hierarchy = segment_hierarchy(result.integrated_grads, difference, halves, ["left", "all"], photo, 1)
    assert hierarchy["labels"] == ["image", "left", "all"]
    assert hierarchy["parent"].tolist() == [-1, 0, 0] and hierarchy["pixels"].tolist() == [SIZE * SIZE, SIZE * SIZE // 2, SIZE * SIZE // 2]
    assert hierarchy["value"][0].item() == pytest.approx(1.0, abs=1e-12)

    flat = segment_hierarchy(result.integrated_grads, difference, None, [], photo, 1)
    assert flat["labels"] == ["image"] and flat["parent"].tolist() == [-1]
    assert flat["label_map"].eq(0).all() and flat["dividend"].tolist() == [1.0]


def test_superpixels_directly_under_root(path, photo):
    inputs, baseline, result = path
    hierarchy = segment_hierarchy(result.integrated_grads, inputs - baseline, None, [], photo, 30)
    assert hierarchy["parent"][1:].eq(0).all() and len(hierarchy["labels"]) > 10
    assert hierarchy["labels"][1:] == [f"image superpixel {index}" for index in range(1, len(hierarchy["labels"]))]
    assert set(hierarchy["label_map"].unique().tolist()) == set(range(1, len(hierarchy["labels"])))


def test_unlabelled_and_missing_slic_labels_still_partition(monkeypatch, path, photo):
    def gappy_slic(image, mask, **_):
        labels = np.where(np.arange(SIZE) < SIZE // 2, 3, 9)[None, :].repeat(SIZE, 0) * mask
        labels[mask & (np.arange(SIZE)[:, None] % 5 == 0)] = 0
        return labels

    monkeypatch.setattr(idg_hierarchy, "slic", gappy_slic)
    inputs, baseline, result = path
    hierarchy = segment_hierarchy(result.integrated_grads, inputs - baseline, None, [], photo, 8)
    assert hierarchy["labels"] == ["image", "image superpixel 1", "image superpixel 2"]
    assert hierarchy["pixels"].tolist() == [SIZE * SIZE, SIZE * SIZE // 2, SIZE * SIZE // 2]


def test_zero_norm_groups_and_zero_attribution(path, photo):
    inputs, baseline, result = path
    segments, labels = overlapping_segments()
    difference = (inputs - baseline).clone()
    difference[..., 4:40, 4:40] = 0
    hierarchy = segment_hierarchy(result.integrated_grads, difference, segments, labels, photo, 24)
    person = hierarchy["labels"].index("person")
    below_person = [person] + hierarchy["parent"].eq(person).nonzero().flatten().tolist()
    assert hierarchy["idg"][below_person].eq(0).all() and hierarchy["value"][person].item() == 0
    assert torch.isfinite(hierarchy["idg"]).all()

    nothing = segment_hierarchy(torch.zeros_like(inputs), inputs - baseline, segments, labels, photo, 24)
    assert nothing["dividend"].eq(0).all() and nothing["value"].eq(0).all()


def test_round_trips_through_reply_encodings(path, photo):
    inputs, baseline, result = path
    hierarchy = segment_hierarchy(result.integrated_grads, inputs - baseline, *overlapping_segments(), photo, 24)
    loaded = read_reply(encode_gzip_torch({"idg_hierarchy": hierarchy}))["idg_hierarchy"]
    assert loaded["labels"] == hierarchy["labels"] and torch.equal(loaded["value"], hierarchy["value"])
    arrays = np.load(io.BytesIO(encode_npz({"idg_hierarchy": hierarchy})))
    assert arrays["idg_hierarchy/labels"].tolist() == hierarchy["labels"]
    np.testing.assert_array_equal(arrays["idg_hierarchy/label_map"], hierarchy["label_map"].numpy())
    decoded = json.loads(encode_json({"idg_hierarchy": hierarchy}))["idg_hierarchy"]
    assert decoded["value"] == hierarchy["value"].tolist() and decoded["parent"] == hierarchy["parent"].tolist()


def test_superpixel_image_of():
    inputs = torch.stack([torch.linspace(-3, 5, 12).view(3, 4), torch.full((3, 4), 7.0), torch.arange(12.0).view(3, 4), torch.ones(3, 4)])[None]
    image = superpixel_image_of(inputs)
    assert image.shape == (3, 4, 3) and image.dtype == np.float64
    assert image[..., 0].min() == 0 and image[..., 0].max() == 1 and np.all(image[..., 1] == 0)
    np.testing.assert_allclose(image[..., 2], np.arange(12.0).reshape(3, 4) / 11)
    grey = superpixel_image_of(torch.arange(12.0).view(1, 1, 3, 4))
    assert grey.shape == (3, 4, 3) and np.array_equal(grey[..., 0], grey[..., 2])


def test_render_draws_hierarchy_panels(path, photo, tmp_path):
    inputs, baseline, result = path
    hierarchy = segment_hierarchy(result.integrated_grads, inputs - baseline, *overlapping_segments(), photo, 24)
    original = (transform.resize(photo, (96, 128)) * 255).astype(np.uint8)
    reply = {"integrated_grads": result.integrated_grads.float(), "input_region": torch.tensor([0.0, 0.0, 128.0, 96.0])}
    plain = render_reply(reply, original)
    assert len(plain.axes) == 2
    plt.close(plain)
    with_hierarchy = render_reply({**reply, "idg_hierarchy": hierarchy}, original)
    assert [axis.get_title() for axis in with_hierarchy.axes][2:] == ["IDG hierarchy: leaf values", "IDG hierarchy: values (colour: IDG sign)"]
    assert len(with_hierarchy.axes[3].patches) == len(hierarchy["labels"])
    plt.close(with_hierarchy)
    png = tmp_path / "hierarchy.png"
    save_render({**reply, "idg_hierarchy": json.loads(encode_json(hierarchy))}, original, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
