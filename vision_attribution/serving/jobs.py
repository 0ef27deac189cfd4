"""Requests as the service receives them, the jobs it decodes them into, and the replies it sends back.

A job knows once and for all what it asks for: its protocol (native, seed, KServe v2), its reply type, and for
an explanation its quadrature rule, its paths (baselines, noise), chunk size, whether the path is kept and its
IDG hierarchy.
"""
import enum
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from ..adapters.base import ExplanationPlan, ModelInput
from ..attribution.baselines import BLACK_AND_WHITE, DEFAULT_SIGMA, DETERMINISTIC_BASELINES, RANDOM_BASELINES, UPLOADED_BASELINE
from ..attribution.engine import PathProblem
from ..attribution.guided_path import DEFAULT_FRACTION, DEFAULT_MAX_DIST, GuidedSpec
from ..attribution.scale_space import DEFAULT_GRAD_STEP, DEFAULT_MAX_SIGMA, BlurPath
from ..attribution.quadrature import ADAPTIVE_METHOD, RuleSpec, TooFewSteps
from ..formats.errors import RequestError
from ..formats.kserve_v2 import Output
from .options import BLUR_IG, GUIDED_IG, option_or_default
from .settings import AttributionSettings


class Protocol(enum.Enum):
    NATIVE = "native"  # docs/formats.md: a raw image, a multipart form, or JSON with "image"
    SEED = "seed"  # a seed's JSON ("img_data"), answered with the seed's reply where the seed had one
    KSERVE_V2 = "kserve_v2"  # the Open Inference Protocol, through TorchServe's kservev2 envelope


@dataclass
class IncomingRequest:
    """One request of a batch: TorchServe's field dict, its headers, whether it came to /explanations, its id."""

    fields: dict
    headers: dict = field(default_factory=dict)
    explain: bool = False
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))  # TorchServe's, where it gives one
    kserve_v2_inputs: Optional[list] = None  # the inputs of a KServe v2 request (formats/kserve_v2.py); fields unused then

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value.decode() if isinstance(value, bytes) else value
        return None


@dataclass
class Reply:
    """One request's answer. body: the encoded reply; outputs: a KServe v2 reply's outputs for the envelope
    instead; error: the message of an error reply (status 4xx/5xx), with its request id where it was logged."""

    status: int
    content_type: str
    body: bytes = b""
    protocol: Protocol = Protocol.NATIVE
    outputs: Optional[list[Output]] = None
    error: Optional[str] = None


DEFAULT_NOISE_STDEV = 0.15
"""SmoothGrad's noise level relative to the input's range (Smilkov et al. found 10-20% best)."""
BLUR_IG_START = "blurred"
"""The reply's `baseline` of Blur IG: its path starts at the input blurred by max_sigma."""
STRAIGHT_PATH_OPTIONS = ("baseline", "baseline_sigma", "baseline_image", "baselines", "seed", "noise_samples", "noise_stdev", "noise_aggregation")
BLUR_IG_OPTIONS = ("max_sigma", "grad_step")
GUIDED_IG_OPTIONS = ("fraction", "max_dist")


@dataclass(frozen=True)
class PathSetSpec:
    """Which paths one explanation integrates: one straight path from a baseline (IG), `baselines` K > 1 from K
    baselines (expected gradients), `noise_samples` noisy inputs (SmoothGrad over IG), or Blur IG's path through scale
    space; attribution/baselines.py defines the baseline kinds. sigma: of a blur or gaussian baseline; seed: of every
    random draw; max_sigma, grad_step: Blur IG's (attribution/scale_space.py). guided: each path is Guided IG's
    from its baseline (attribution/guided_path.py), with its fraction and max_dist."""

    baseline: str
    sigma: Optional[float] = None
    baselines: int = 1
    noise_samples: int = 0
    noise_stdev: float = DEFAULT_NOISE_STDEV
    noise_aggregation: str = "smoothgrad"
    seed: int = 0
    blur_ig: bool = False
    max_sigma: float = DEFAULT_MAX_SIGMA
    grad_step: float = DEFAULT_GRAD_STEP
    guided: bool = False
    fraction: float = DEFAULT_FRACTION
    max_dist: float = DEFAULT_MAX_DIST

    @property
    def method(self) -> str:
        if self.blur_ig:
            return BLUR_IG
        if self.guided:
            return GUIDED_IG
        if self.noise_samples:
            return "smoothgrad"
        return "expected_gradients" if self.baselines > 1 else "integrated_gradients"

    @property
    def count(self) -> int:
        """The number of paths."""
        return self.noise_samples or self.baselines

    @property
    def draws(self) -> bool:
        return self.baseline in RANDOM_BASELINES or self.noise_samples > 0

    def description(self) -> dict[str, Any]:
        """The reply's `attribution`: the method and what it was computed from, each parameter where it applies."""
        described: dict[str, Any] = {"method": self.method, "baseline": self.baseline}
        if self.blur_ig:
            return {**described, "max_sigma": self.max_sigma, "grad_step": self.grad_step}
        if self.guided:
            described.update(fraction=self.fraction, max_dist=self.max_dist)
        if self.baseline in DEFAULT_SIGMA:
            described["baseline_sigma"] = self.sigma
        if self.baselines > 1:
            described["baselines"] = self.baselines
        if self.noise_samples:
            described.update(noise_samples=self.noise_samples, noise_stdev=self.noise_stdev, noise_aggregation=self.noise_aggregation)
        if self.draws:
            described["seed"] = self.seed
        return described

    @classmethod
    def resolve(cls, options: dict[str, Any], settings: AttributionSettings) -> "PathSetSpec":
        """The request's paths; options that do not apply to what it asks for are a 400 rather than ignored."""
        method = options.get("attribution_method")
        for named, owned in ((BLUR_IG, BLUR_IG_OPTIONS), (GUIDED_IG, GUIDED_IG_OPTIONS)):
            stray = sorted(name for name in owned if name in options)
            if stray and method != named:
                raise RequestError(f"option(s) {stray} shape {'Blur' if named == BLUR_IG else 'Guided'} IG's path; send \"attribution_method\": \"{named}\" with them")
        if method == BLUR_IG:
            stray = sorted(name for name in STRAIGHT_PATH_OPTIONS if name in options)
            if stray:
                raise RequestError(f"option(s) {stray} shape straight paths; Blur IG's path starts at the blurred input (its 'max_sigma')")
            return cls(BLUR_IG_START, blur_ig=True, max_sigma=options.get("max_sigma", DEFAULT_MAX_SIGMA), grad_step=options.get("grad_step", DEFAULT_GRAD_STEP))
        uploaded = options.get("baseline_image")
        baseline = options.get("baseline", UPLOADED_BASELINE if uploaded else settings.baseline)
        if uploaded and baseline != UPLOADED_BASELINE:
            raise RequestError(f"'baseline_image' is the baseline of baseline '{UPLOADED_BASELINE}', not '{baseline}'; send one or the other")
        if baseline == UPLOADED_BASELINE and not uploaded:
            raise RequestError(f"baseline '{UPLOADED_BASELINE}' needs 'baseline_image': an image file (multipart) or base64 images (JSON)")
        sigma = options.get("baseline_sigma")
        if sigma is not None and baseline not in DEFAULT_SIGMA:
            raise RequestError(f"'baseline_sigma' is the sigma of a {' or '.join(DEFAULT_SIGMA)} baseline; baseline '{baseline}' has none")
        if baseline == "gaussian" and sigma is not None and sigma > 1:
            raise RequestError(f"'baseline_sigma' of a gaussian baseline is a fraction of the value range [0, 1]: at most 1, got {sigma:g}")
        count = options.get("baselines", len(uploaded) if uploaded else 2 if baseline == BLACK_AND_WHITE else 1)
        if baseline == BLACK_AND_WHITE and count != 2:
            raise RequestError(f"baseline '{BLACK_AND_WHITE}' is two baselines; leave 'baselines' out or send 2, not {count}")
        if uploaded and count != len(uploaded):
            raise RequestError(f"'baselines' is {count} but {len(uploaded)} baseline image(s) were sent; leave 'baselines' out or send as many images")
        if count > 1 and baseline in DETERMINISTIC_BASELINES:
            raise RequestError(
                f"'baselines': {count} integrates {count} paths from baselines drawn at random ({', '.join(RANDOM_BASELINES)}) or "
                f"uploaded ('{UPLOADED_BASELINE}'); baseline '{baseline}' is one image, so its paths would all be the same"
            )
        samples = options.get("noise_samples", 0)
        stray = sorted(name for name in ("noise_stdev", "noise_aggregation") if name in options)
        if stray and not samples:
            raise RequestError(f"option(s) {stray} shape SmoothGrad's noise; send 'noise_samples' with them")
        if samples and count > 1:
            raise RequestError("send either 'noise_samples' (SmoothGrad: noisy inputs, one baseline) or several baselines, not both")
        spec = cls(
            baseline, DEFAULT_SIGMA.get(baseline) if sigma is None else sigma, count, samples,
            options.get("noise_stdev", DEFAULT_NOISE_STDEV), options.get("noise_aggregation", "smoothgrad"), options.get("seed", 0),
            guided=method == GUIDED_IG, fraction=options.get("fraction", DEFAULT_FRACTION), max_dist=options.get("max_dist", DEFAULT_MAX_DIST),
        )  # fmt: skip
        if "seed" in options and not spec.draws:
            raise RequestError(f"'seed' seeds random baselines ({', '.join(RANDOM_BASELINES)}) and SmoothGrad's noise; this request draws neither")
        return spec


@dataclass(frozen=True)
class ExplanationSpec:
    """How one explanation is computed, resolved once from its request's options and the archive's settings."""

    rule: Union[RuleSpec, GuidedSpec]  # Guided IG's steps where its paths are Guided IG's
    paths: PathSetSpec
    internal_batch_size: int
    keep_path: bool
    hierarchy_superpixels: Optional[int]  # superpixels of the IDG hierarchy's leaves, or None for no hierarchy
    xrai: bool = False  # also rank XRAI's regions of the attribution
    default_max_steps: Optional[int] = None  # the archive's default max_steps where rule.max_steps was lowered to fit the reply

    @classmethod
    def resolve(cls, options: dict[str, Any], settings: AttributionSettings, seed_reply: bool) -> "ExplanationSpec":
        # The seed reply carries the path tensors, so a seed request keeps them unless it says return_path=false.
        keep_path = options.get("return_path", True) if seed_reply else option_or_default(options, "return_path", settings)
        paths = PathSetSpec.resolve(options, settings)
        if keep_path and paths.count > 1:
            reason = "a seed request returns them unless it sends" if seed_reply and "return_path" not in options else "send"
            raise RequestError(f"the path tensors are one path's; this explanation integrates {paths.count} paths: {reason} \"return_path\": false")
        return cls(
            rule=guided_steps(options, settings, paths) if paths.guided else resolve_rule(options, settings),
            paths=paths,
            internal_batch_size=option_or_default(options, "internal_batch_size", settings),
            keep_path=keep_path,
            hierarchy_superpixels=options.get("idg_hierarchy"),
            xrai=options.get("xrai", False),
        )


def guided_steps(options: dict[str, Any], settings: AttributionSettings, paths: PathSetSpec) -> GuidedSpec:
    """Guided IG's steps: `n_steps` (or the archive's default n_steps), or with `tolerance` (or the archive's
    default tolerance, where n_steps is not sent) paths of 16, 32, ... steps up to max_steps until one meets it."""
    if "method" in options:
        raise RequestError("option 'method' chooses a quadrature; Guided IG takes steps of 1/n of the L1 distance, each decided by the gradient before it")
    if "tolerance" in options and "n_steps" in options:
        raise RequestError("'tolerance' runs Guided IG paths of 16, 32, 64, ... steps until one meets it; it cannot be combined with 'n_steps': send one or the other")
    tolerance = options.get("tolerance", None if "n_steps" in options else settings.tolerance)
    if tolerance is None and "max_steps" in options:
        raise RequestError("option 'max_steps' bounds a tolerance-driven explanation; send a 'tolerance' with it, or 'n_steps' alone")
    if tolerance is not None:
        return GuidedSpec(fraction=paths.fraction, max_dist=paths.max_dist, tolerance=tolerance, max_steps=option_or_default(options, "max_steps", settings))
    return GuidedSpec(option_or_default(options, "n_steps", settings), paths.fraction, paths.max_dist)


def resolve_rule(options: dict[str, Any], settings: AttributionSettings) -> RuleSpec:
    """The request's quadrature: `tolerance` (or the archive's default tolerance) refines the adaptive rule up
    to max_steps nodes; `n_steps` or a fixed `method` asks for a fixed rule. Options that contradict are a 400."""
    fixed = "n_steps" in options or options.get("method", ADAPTIVE_METHOD) != ADAPTIVE_METHOD
    if "tolerance" in options and fixed:
        raise RequestError(
            f"'tolerance' refines the nested {ADAPTIVE_METHOD} rule until the completeness error is small enough; it cannot be "
            "combined with 'n_steps' or another 'method': send either 'tolerance' (and 'max_steps') or 'n_steps'/'method'"
        )
    tolerance = options.get("tolerance", None if fixed else settings.tolerance)
    if tolerance is not None:
        return RuleSpec(tolerance=tolerance, max_steps=option_or_default(options, "max_steps", settings))
    if "max_steps" in options:
        raise RequestError("option 'max_steps' bounds a tolerance-driven explanation; send a 'tolerance' with it, or 'n_steps' alone")
    if options.get("method") == ADAPTIVE_METHOD:
        raise RequestError(f"method {ADAPTIVE_METHOD} refines until a 'tolerance' is met; send one (this archive has no default tolerance)")
    try:
        return RuleSpec(option_or_default(options, "method", settings), option_or_default(options, "n_steps", settings))
    except TooFewSteps as error:
        raise RequestError(f"option 'n_steps' {error.requirement}") from None


@dataclass
class Job:
    """A decoded request: its image prepared for the model, its validated options, how it is answered."""

    request_id: str
    protocol: Protocol
    reply_type: str  # formats.replies: gzip, npz, json, png, opex, max, kserve_v2
    options: dict[str, Any]
    model_input: ModelInput


@dataclass
class PredictionJob(Job):
    """A prediction: its batch's predictions share one forward pass."""


@dataclass
class ExplanationJob(Job):
    """An explanation, planned on the real input: its integral is computed with its batch's."""

    spec: ExplanationSpec
    plan: ExplanationPlan
    path_inputs: torch.Tensor  # (K, C, h, w): where each path ends (the input, or SmoothGrad's noisy inputs)
    path_baselines: torch.Tensor  # (K, C, h, w): where each path starts
    seed_keys: Optional[tuple[str, ...]]  # the seed reply's keys where the reply is the seed's
    xrai_segmentations: Optional[list[np.ndarray]] = None  # XRAI's over-segmentations of the input, where it asks for XRAI

    def path_problems(self) -> list[PathProblem]:
        """One problem per path, k = 0 .. K - 1."""
        spec = self.spec
        return [
            PathProblem(
                self.plan.path_target, self.path_inputs[k : k + 1], self.path_baselines[k : k + 1], spec.rule,
                internal_batch_size=spec.internal_batch_size, groups=self.plan.groups, keep_path=spec.keep_path,
                path=BlurPath(self.path_inputs[k : k + 1], spec.paths.max_sigma, spec.paths.grad_step) if spec.paths.blur_ig else None,
            )
            for k in range(len(self.path_inputs))
        ]  # fmt: skip


@dataclass
class Result:
    """A job's answer before it is encoded: the prediction or explanation document."""

    job: Job
    document: dict[str, Any]
