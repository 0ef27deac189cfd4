"""Adapter for image classifiers: resize and normalise, logits, class targets, IDG over a patch grid."""
from typing import Any, Callable, Sequence

import torch

from ..formats.replies import SEED_CLASSIFIER_EXPLANATION_KEYS
from ..attribution.engine import PathTarget
from .base import ExplanationPlan, ModelInput
from .fixed_size import FixedSizeInput, class_by_name_or_index


def patch_grid(size: tuple[int, int], cells: int) -> tuple[torch.Tensor, list[str]]:
    """Boolean masks (cells*cells, h, w) tiling the input in a cells x cells grid, row-major, with labels."""
    rows = torch.arange(size[0]) * cells // size[0]
    cols = torch.arange(size[1]) * cells // size[1]
    cell_of_pixel = rows[:, None] * cells + cols[None, :]
    masks = cell_of_pixel[None] == torch.arange(cells * cells)[:, None, None]
    return masks, [f"patch r{r} c{c}" for r in range(cells) for c in range(cells)]


def classifier_prediction(logits: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Reply to a classifier prediction, from logits (K,): the top class, the top 5 ({index, name, probability}
    records, best first), logits and probabilities (1, K)."""
    probabilities = logits.float().softmax(dim=0)
    top = probabilities.topk(min(5, len(class_names)))
    indices = top.indices.tolist()
    return {
        "predicted_name": class_names[indices[0]],
        "predicted_class": indices[0],
        "top5": [{"index": i, "name": class_names[i], "probability": p} for i, p in zip(indices, top.values.tolist())],
        "output": logits[None].float().cpu(),
        "probabilities": probabilities[None].cpu(),
    }


class ClassifierAdapter(FixedSizeInput):
    """Serves a classifier whose `logits_of(x)` maps (B, 3, h, w) normalised input to (B, K) logits."""

    seed_explanation_keys = SEED_CLASSIFIER_EXPLANATION_KEYS
    predicts_targets = True  # a prediction with a `target` reports that class's index and probability
    options = ("target", "idg_grid")
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
        super().__init__(input_size, mean, std, device, resize_mode)
        self.logits_of = logits_of
        self.class_names = list(class_names)
        self.idg_grid = idg_grid

    def class_index(self, target, logits: torch.Tensor) -> int:
        """A class name or index -> index; None -> the predicted class."""
        return int(logits.argmax()) if target is None else class_by_name_or_index(target, self.class_names)

    @torch.no_grad()
    def predict(self, inputs: list[ModelInput], options: list[dict]) -> list[dict]:
        logits = self.logits_of(torch.cat([item.tensor for item in inputs])).float()
        predictions = [classifier_prediction(row, self.class_names) for row in logits]
        for prediction, item_options in zip(predictions, options):
            if "target" in item_options:
                index = class_by_name_or_index(item_options["target"], self.class_names)
                prediction.update(target_class=index, target_probability=float(prediction["probabilities"][0, index]))
        return predictions

    def plan_explanation(self, model_input: ModelInput, options: dict) -> ExplanationPlan:
        with torch.no_grad():
            logits = self.logits_of(model_input.tensor).float()
        index = self.class_index(options.get("target"), logits[0])

        def class_logit(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, index]

        groups, labels = patch_grid(self.input_size, options.get("idg_grid", self.idg_grid))
        return ExplanationPlan(
            path_target=PathTarget(self.logits_of, class_logit),
            target={"kind": "class", "index": index, "name": self.class_names[index]},
            prediction={"output": logits.cpu(), "target_class": index},
            groups=groups,
            group_labels=labels,
            groups_are_segments=False,
        )
