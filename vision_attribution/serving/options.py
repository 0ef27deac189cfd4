"""Every option a request may carry, declared once: its check (bounded by the archive's limits), whether only
an explanation uses it, and the archive setting (model-config `attribution:`) that gives its default.

Each archive accepts PATH_OPTIONS plus its adapter's own options; docs/formats.md lists them all.
"""
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from ..attribution.baselines import BASELINE_KINDS
from ..attribution.path_sets import AGGREGATIONS
from ..attribution.quadrature import ADAPTIVE_METHOD, ADAPTIVE_MIN_STEPS, METHODS
from ..formats import values
from ..formats.errors import RequestError
from .settings import AttributionSettings, Limits


BLUR_IG = "blur_ig"
GUIDED_IG = "guided_ig"
ATTRIBUTION_METHODS = ("integrated_gradients", BLUR_IG, GUIDED_IG)
"""The request's `attribution_method`: straight paths (IG, and over several paths expected gradients or SmoothGrad),
Blur IG's path through scale space, or Guided IG's path from the same baselines, chosen step by step."""


@dataclass(frozen=True)
class Option:
    """check: the archive's limits -> the value check. default: the AttributionSettings field that is the
    option's default where a request leaves it out (None: the adapter's own default, or absent)."""

    check: Callable[[Limits], values.Check]
    explanation_only: bool = False
    default: Optional[str] = None


def _always(check: values.Check) -> Callable[[Limits], values.Check]:
    return lambda limits: check


OPTIONS: dict[str, Option] = {
    "n_steps": Option(lambda limits: values.integer(1, limits.max_steps), True, "n_steps"),
    "method": Option(_always(values.choice(*METHODS, ADAPTIVE_METHOD)), True, "method"),
    "tolerance": Option(_always(values.number(1e-6, 1.0)), True, "tolerance"),
    "max_steps": Option(lambda limits: values.integer(ADAPTIVE_MIN_STEPS, limits.max_steps), True, "tolerance_max_steps"),
    "idg_hierarchy": Option(_always(values.integer(1, 1000)), True),
    "target": Option(_always(values.class_reference), True),
    "baseline": Option(_always(values.choice(*BASELINE_KINDS)), True, "baseline"),
    "baseline_sigma": Option(_always(values.number(1e-3, 1000.0)), True),
    "baseline_image": Option(lambda limits: values.images(limits.max_image_pixels, limits.max_paths, "baseline_image"), True),
    "baselines": Option(lambda limits: values.integer(1, limits.max_paths), True),
    "seed": Option(_always(values.integer(0, 2**63 - 1)), True),
    "noise_samples": Option(lambda limits: values.integer(1, limits.max_paths), True),
    "noise_stdev": Option(_always(values.number(1e-6, 1.0)), True),
    "noise_aggregation": Option(_always(values.choice(*AGGREGATIONS)), True),
    "xrai": Option(_always(values.boolean), True),
    "attribution_method": Option(_always(values.choice(*ATTRIBUTION_METHODS)), True),
    "max_sigma": Option(_always(values.number(0.1, 1000.0)), True),
    "grad_step": Option(_always(values.number(1e-4, 1.0)), True),
    "fraction": Option(_always(values.number(1e-4, 1.0)), True),
    "max_dist": Option(_always(values.number(0.0, 1.0)), True),
    "internal_batch_size": Option(lambda limits: values.integer(1, limits.max_internal_batch_size), True, "internal_batch_size"),
    "return_path": Option(_always(values.boolean), True, "return_path"),
    "threshold": Option(_always(values.number(0.0, 1.0))),
    "region_reduction": Option(_always(values.choice("sum", "mean")), True),
    "instance": Option(_always(values.integer(0)), True),
    "idg_grid": Option(_always(values.integer(1, 32)), True),
    "native_resolution": Option(_always(values.boolean)),
    "points": Option(_always(values.extreme_points)),
    "label": Option(_always(values.integer(1, 255))),
    "image_size": Option(_always(values.integer(16, 1024))),
}  # fmt: skip

PATH_OPTIONS = (
    "n_steps", "method", "tolerance", "max_steps", "baseline", "baseline_sigma", "baseline_image", "baselines", "seed",
    "noise_samples", "noise_stdev", "noise_aggregation", "attribution_method", "max_sigma", "grad_step", "fraction", "max_dist",
    "internal_batch_size", "return_path", "idg_hierarchy", "xrai",
)  # fmt: skip
"""The explanation options every archive accepts (the path integral's); each adapter adds its own."""


def checks_for(names: Iterable[str], limits: Limits) -> dict[str, values.Check]:
    """The checks of the options `names`, bounded by `limits`: what formats.requests validates a request with."""
    return {name: OPTIONS[name].check(limits) for name in names}


def option_or_default(options: dict[str, Any], name: str, settings: AttributionSettings) -> Any:
    """The request's value of option `name`, or the archive's default for it."""
    return options[name] if name in options else getattr(settings, OPTIONS[name].default)


def refuse_explanation_options(options: dict[str, Any], predicts_targets: bool) -> None:
    """A prediction ignores explanation options: refuse them rather than drop them silently. A classifier's
    prediction reports its `target` (the classifier seeds send target_class with every request)."""
    given = sorted(name for name in options if OPTIONS[name].explanation_only and not (predicts_targets and name == "target"))
    if given:
        raise RequestError(f"option(s) {given} only apply to explanations; send them to /explanations/<model>, or leave them out of a prediction")
