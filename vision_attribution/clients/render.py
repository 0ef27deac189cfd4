"""Render replies over the original image as PNG: IG heatmap (named by its method), its spread across paths, XRAI's
regions, IDG dividends per mask, predicted masks, IDG hierarchy."""
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402


def _array(value) -> Optional[np.ndarray]:
    if value is None:
        return None
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def place_on_image(values: np.ndarray, image_size: tuple[int, int], region) -> np.ndarray:
    """Map an (h, w) float map over the model input onto the (H, W) original through its region (l, t, r, b)."""
    height, width = image_size
    left, top, right, bottom = (float(v) for v in region)
    canvas = np.zeros((height, width), dtype=np.float32)
    box = (max(0, round(left)), max(0, round(top)), min(width, round(right)), min(height, round(bottom)))
    if box[2] <= box[0] or box[3] <= box[1]:
        return canvas
    resized = Image.fromarray(values.astype(np.float32), mode="F").resize((box[2] - box[0], box[3] - box[1]), Image.BILINEAR)
    canvas[box[1] : box[3], box[0] : box[2]] = np.asarray(resized)
    return canvas


def render_reply(reply: dict, image: np.ndarray, title: str = "") -> plt.Figure:
    """A figure of the panels the reply supports: masks, |IG| heatmap, IDG dividend per mask, IDG hierarchy."""
    height, width = image.shape[:2]
    region = _array(reply.get("input_region"))
    region = region if region is not None else (0, 0, width, height)
    panels = []
    masks = _array(reply.get("pred_masks"))
    if masks is not None:
        panels.append(("predicted masks", _mask_overlay(image, masks)))
    ig = _array(reply.get("integrated_grads"))
    if ig is not None:
        heat = np.abs(ig[0]).sum(0)
        scale = max(np.percentile(heat, 99.5), 1e-12)
        method = reply.get("attribution", {}).get("method", "integrated_gradients").replace("_", " ")
        panels.append((f"|{method}|", place_on_image(np.clip(heat / scale, 0, 1), (height, width), region)))
        spread = _array(reply.get("integrated_grads_std"))
        if spread is not None:  # on the attribution's own scale, so that the two panels compare
            count = len(reply.get("paths", []))
            panels.append((f"spread across {count} paths (std)", place_on_image(np.clip(spread[0].sum(0) / scale, 0, 1), (height, width), region)))
    xrai = reply.get("xrai")
    if xrai is not None:
        gain = _array(xrai["heatmap"])
        top = (gain >= np.percentile(gain, 70)).astype(np.float32)  # the most attributed 30% of the pixels, by region
        panels.append(("XRAI: gain per region", place_on_image(gain.astype(np.float32), (height, width), region)))
        panels.append(("XRAI: top 30%", place_on_image(top, (height, width), region)))
    idg = reply.get("idg_per_mask")
    if idg is not None and len(_array(idg["dividends"])):
        dividends, group_masks = _array(idg["dividends"]), _array(idg["masks"]).astype(np.float32)
        share = np.tensordot(dividends, group_masks, axes=1) if group_masks.ndim == 3 else np.tensordot(dividends, group_masks.max(1), axes=1)
        panels.append(("IDG dividend per mask", place_on_image(share, (height, width), region)))
    hierarchy = reply.get("idg_hierarchy")
    if hierarchy is not None:
        leaf_values = _array(hierarchy["value"])[_array(hierarchy["label_map"])]
        panels.append(("IDG hierarchy: leaf values", place_on_image(leaf_values, (height, width), region)))
        panels.append(("IDG hierarchy: values (colour: IDG sign)", lambda axis: draw_idg_treemap(axis, hierarchy)))
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4.5 * (len(panels) + 1), 4.8))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title(title or "input")
    for axis, (name, layer) in zip(axes[1:], panels):
        if callable(layer):
            layer(axis)
        elif layer.ndim == 3:
            axis.imshow(layer)
        else:
            axis.imshow(image)
            axis.imshow(layer, cmap="inferno", alpha=0.6)
        axis.set_title(name)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    return figure


def draw_idg_treemap(axis: plt.Axes, hierarchy: dict, min_labelled_area: float = 0.015) -> None:
    """Nested rectangles in the unit square, area = value: each node's children split it in turn along x and y.

    The strip a node keeps after its children is its own dividend. Colour: IDG / max |IDG| (red +, blue -).
    Labelled: names and values of segments, values of superpixels, where the rectangle is large enough.
    """
    parent, value, idg = (_array(hierarchy[key]) for key in ("parent", "value", "idg"))
    labels = list(hierarchy["labels"])
    children = [np.flatnonzero(parent == node) for node in range(len(parent))]
    colours = plt.get_cmap("coolwarm")
    scale = max(float(np.abs(idg).max()), 1e-300)

    def draw(node: int, x: float, y: float, w: float, h: float, depth: int) -> None:
        colour = colours(0.5 + 0.5 * idg[node] / scale)
        axis.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor="black", linewidth=max(0.4, 2.0 - 0.8 * depth)))
        if depth > 0 and w * h >= min_labelled_area:
            text = f"{labels[node]}\n{value[node]:.2f}" if depth == 1 else f"{value[node]:.2f}"
            if len(children[node]):
                axis.text(x + 0.01, y + 0.01, text, ha="left", va="top", fontsize=8, fontweight="bold", clip_on=True)
            else:
                axis.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=6, clip_on=True)
        if value[node] <= 0:
            return
        offset = 0.0
        for child in children[node]:
            share = value[child] / value[node]
            if depth % 2 == 0:
                draw(child, x + offset * w, y, share * w, h, depth + 1)
            else:
                draw(child, x, y + offset * h, w, share * h, depth + 1)
            offset += share

    draw(0, 0.0, 0.0, 1.0, 1.0, 0)
    axis.set_xlim(0, 1)
    axis.set_ylim(1, 0)
    axis.set_aspect("equal")


def _mask_overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Blend (N, H, W) boolean masks, each in its own colour, over (H, W, 3) uint8."""
    overlay = image.astype(np.float32).copy()
    colours = plt.get_cmap("tab10")
    for index, mask in enumerate(masks.astype(bool)):
        colour = np.array(colours(index % 10)[:3]) * 255
        overlay[mask] = 0.45 * overlay[mask] + 0.55 * colour
    return overlay.astype(np.uint8)


def save_render(reply: dict, image: np.ndarray, path, title: str = "") -> None:
    figure = render_reply(reply, image, title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
