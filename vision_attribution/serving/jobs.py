"""Requests as the service receives them, the jobs it decodes them into, and the replies it sends back.

A job knows once and for all what it asks for: its protocol (native, seed, KServe v2), its reply type, and for
an explanation its quadrature rule, baseline, chunk size, whether the path is kept and its IDG hierarchy.
"""
import enum
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..adapters.base import ExplanationPlan, ModelInput
from ..attribution.engine import PathProblem
from ..attribution.quadrature import ADAPTIVE_METHOD, RuleSpec, TooFewSteps
from ..formats.errors import RequestError
from ..formats.kserve_v2 import Output
from .options import option_or_default
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


@dataclass(frozen=True)
class ExplanationSpec:
    """How one explanation is computed, resolved once from its request's options and the archive's settings."""

    rule: RuleSpec
    baseline: str
    internal_batch_size: int
    keep_path: bool
    hierarchy_superpixels: Optional[int]  # superpixels of the IDG hierarchy's leaves, or None for no hierarchy
    default_max_steps: Optional[int] = None  # the archive's default max_steps where rule.max_steps was lowered to fit the reply

    @classmethod
    def resolve(cls, options: dict[str, Any], settings: AttributionSettings, seed_reply: bool) -> "ExplanationSpec":
        # The seed reply carries the path tensors, so a seed request keeps them unless it says return_path=false.
        keep_path = options.get("return_path", True) if seed_reply else option_or_default(options, "return_path", settings)
        return cls(
            rule=resolve_rule(options, settings),
            baseline=option_or_default(options, "baseline", settings),
            internal_batch_size=option_or_default(options, "internal_batch_size", settings),
            keep_path=keep_path,
            hierarchy_superpixels=options.get("idg_hierarchy"),
        )


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
    baseline: torch.Tensor  # (1, C, h, w), like model_input.tensor
    seed_keys: Optional[tuple[str, ...]]  # the seed reply's keys where the reply is the seed's

    def path_problem(self) -> PathProblem:
        spec = self.spec
        return PathProblem(
            self.plan.path_target, self.model_input.tensor, self.baseline, spec.rule,
            internal_batch_size=spec.internal_batch_size, groups=self.plan.groups, keep_path=spec.keep_path,
        )  # fmt: skip


@dataclass
class Result:
    """A job's answer before it is encoded: the prediction or explanation document."""

    job: Job
    document: dict[str, Any]
