"""Adapter for image classifiers: resize and normalise, logits, class targets, IDG over a patch grid."""
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..adapter import ExplanationPlan, ModelInput
from ..decode import PixelLayout
from ..errors import RequestError

RGB_ROWS = PixelLayout(axes="HWC", order="RGB", grey_and_alpha=True)


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Resize (H, W, 3) uint8 to size=(h, w) bilinearly; mode "stretch" ignores the aspect ratio, "center_crop"
    scales the shorter side to 8/7 of the target and crops the centre (ImageNet evaluation). Returns the
    resized image and the (left, top, right, bottom) region of the original that it shows."""
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    if mode == "stretch":
        return np.asarray(picture.resize((size[1], size[0]), Image.BILINEAR)), (0.0, 0.0, float(width), float(height))
    scale = max(size) * 8 / 7 / min(height, width)
    scaled_w, scaled_h = max(size[1], round(width * scale)), max(size[0], round(height * scale))
    left, top = (scaled_w - size[1]) // 2, (scaled_h - size[0]) // 2
    resized = picture.resize((scaled_w, scaled_h), Image.BILINEAR).crop((left, top, left + size[1], top + size[0]))
    region = (left / scaled_w * width, top / scaled_h * height, (left + size[1]) / scaled_w * width, (top + size[0]) / scaled_h * height)
    return np.asarray(resized), region


def patch_grid(size: tuple[int, int], cells: int) -> tuple[torch.Tensor, list[str]]:
    """Boolean masks (cells*cells, h, w) tiling the input in a cells x cells grid, row-major, with labels."""
    rows = torch.arange(size[0]) * cells // size[0]
    cols = torch.arange(size[1]) * cells // size[1]
    cell_of_pixel = rows[:, None] * cells + cols[None, :]
    masks = cell_of_pixel[None] == torch.arange(cells * cells)[:, None, None]
    return masks, [f"patch r{r} c{c}" for r in range(cells) for c in range(cells)]


class ClassifierAdapter:
    """Serves a classifier whose `logits_of(x)` maps (B, 3, h, w) normalised input to (B, K) logits."""

    seed_layout = RGB_ROWS
    seed_explanation_keys = ("integrated_grads", "integrated_directional_grads", "step_sizes", "intermediates", "output", "target_class")
    options = ("n_steps", "method", "target", "target_class", "baseline", "internal_batch_size", "return_path", "idg_grid")
    prediction_types = ("json", "gzip", "npz")

    def __init__(
        self,
        logits_of: Callable[[torch.Tensor], torch.Tensor],
        class_names: Sequence[str],
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        resize_mode: str = "stretch",
        idg_grid: int = 4,
    ):
        self.logits_of = logits_of
        self.class_names = list(class_names)
        self.input_size = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device = device
        self.resize_mode = resize_mode
        self.idg_grid = idg_grid

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) values in [0, 1] -> the model's input space."""
        return (pixels - self.mean) / self.std

    def prepare(self, image: np.ndarray, options: dict) -> ModelInput:
        resized, region = resize_image(image, self.input_size, self.resize_mode)
        pixels = torch.from_numpy(np.array(resized)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return ModelInput(tensor=self.normalise(pixels), image=image, region=region)

    def class_index(self, target, logits: torch.Tensor) -> int:
        """A class name or index -> index; None -> the predicted class. Unknown classes are a 400."""
        if target is None:
            return int(logits.argmax())
        if isinstance(target, int):
            if not 0 <= target < len(self.class_names):
                raise RequestError(f"class index {target} is out of range 0..{len(self.class_names) - 1}")
            return target
        if target in self.class_names:
            return self.class_names.index(target)
        shown = self.class_names if len(self.class_names) <= 20 else self.class_names[:20] + ["..."]
        raise RequestError(f"unknown class {target!r}; classes are {shown} (or give an index)")

    @torch.no_grad()
    def predict(self, inputs: list[ModelInput], options: list[dict]) -> list[dict]:
        logits = self.logits_of(torch.cat([item.tensor for item in inputs])).float()
        probabilities = logits.softmax(dim=1)
        replies = []
        for row, probs in zip(logits, probabilities):
            top = probs.topk(min(5, len(self.class_names)))
            replies.append(
                {
                    "predicted_name": self.class_names[int(top.indices[0])],
                    "predicted_class": int(top.indices[0]),
                    "top5": [{"index": int(i), "name": self.class_names[int(i)], "probability": float(p)} for p, i in zip(top.values, top.indices)],
                    "output": row[None].cpu(),
                    "probabilities": probs[None].cpu(),
                }
            )
        return replies

    def plan_explanation(self, model_input: ModelInput, options: dict) -> ExplanationPlan:
        with torch.no_grad():
            logits = self.logits_of(model_input.tensor).float()
        index = self.class_index(options.get("target"), logits[0])

        def class_logit(points: torch.Tensor) -> torch.Tensor:
            return self.logits_of(points)[:, index]

        groups, labels = patch_grid(self.input_size, options.get("idg_grid", self.idg_grid))
        return ExplanationPlan(
            target_fn=class_logit,
            target={"kind": "class", "index": index, "name": self.class_names[index]},
            prediction={"output": logits.cpu(), "target_class": index},
            groups=groups,
            group_labels=labels,
        )

    def baseline(self, model_input: ModelInput, kind: str) -> torch.Tensor:
        if kind == "zeros":
            return torch.zeros_like(model_input.tensor)
        return self.normalise(torch.zeros_like(model_input.tensor))
