"""The request pipeline shared by every archive: decode -> model adapter -> attribution engine -> encode.

It knows nothing of TorchServe: the handler hands it plain request dicts and headers, and gets back one
Reply per request, so a bad request fails alone and the rest of its batch is served.
"""
import logging
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from .adapters.base import ExplanationPlan, ModelAdapter, ModelInput
from .encode import encode_error, encode_gzip_torch, encode_json, encode_npz, encode_png
from .engine import PathProblem, Rule, integrate_paths, make_rule
from .errors import RequestError
from .formats import kserve_v2, replies
from .formats.requests import ParsedRequest, parse_request, refuse_explanation_options
from .formats.seed_apis import max_prediction
from .idg_hierarchy import segment_hierarchy, superpixel_image_of
from .quadrature import ADAPTIVE_METHOD, AdaptiveRule
from .settings import AttributionSettings

log = logging.getLogger(__name__)

ENCODERS = {"gzip": encode_gzip_torch, "npz": encode_npz, "json": encode_json, "opex": encode_json, "kserve_v2": kserve_v2.encode_outputs}


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
    body: bytes
    content_type: str
    status: int = 200


@dataclass
class _Prediction:
    """A prediction request waiting for its batch's forward pass."""

    position: int
    request: IncomingRequest
    parsed: ParsedRequest
    model_input: ModelInput
    reply_type: str


@dataclass
class _Explanation:
    """An explanation request, planned and waiting for its batch's path integrals."""

    position: int
    request: IncomingRequest
    parsed: ParsedRequest
    model_input: ModelInput
    plan: ExplanationPlan
    problem: PathProblem
    baseline_kind: str
    seed_reply: bool
    reply_type: str


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, CPU allocator failures (a RuntimeError from c10) and Python's MemoryError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "not enough memory" in str(error))


class AttributionService:
    """Serves one adapter: predictions for plain requests, path-integral explanations for explain requests."""

    def __init__(self, adapter: ModelAdapter, settings: AttributionSettings):
        self.adapter = adapter
        self.settings = settings

    def handle_batch(self, requests: list[IncomingRequest]) -> list[Reply]:
        """One reply per request, in order; the predictions of a batch share one forward pass."""
        answers: list[Optional[Reply]] = [None] * len(requests)
        predictions: list[_Prediction] = []
        explanations: list[_Explanation] = []
        for position, request in enumerate(requests):
            try:
                if request.kserve_v2_inputs is not None:  # the protocol fixes the reply: v2 outputs
                    parsed = kserve_v2.parse_inputs(request.kserve_v2_inputs, self.adapter.options, self.settings.limits)
                else:
                    parsed = parse_request(
                        request.fields, self.adapter.seed_layout, self.adapter.options, self.settings.limits, request.header("content-type")
                    )
                if request.explain:
                    reply_type = "kserve_v2" if request.kserve_v2_inputs is not None else (
                        replies.negotiate_reply_type(request.header("accept"), "gzip", replies.EXPLANATION_TYPES))
                    explanations.append(self._plan_explanation(position, request, parsed, reply_type))
                else:
                    refuse_explanation_options(parsed.options, getattr(self.adapter, "predicts_targets", False))
                    types = self.adapter.prediction_types
                    default = "gzip" if parsed.seed_format and "gzip" in types else types[0]
                    reply_type = "kserve_v2" if request.kserve_v2_inputs is not None else (
                        replies.negotiate_reply_type(request.header("accept"), default, types))
                    predictions.append(_Prediction(position, request, parsed, self.adapter.prepare(parsed.image, parsed.options), reply_type))
            except Exception as error:  # noqa: BLE001 - every failure becomes this request's reply
                answers[position] = self._failure(error, request)
        if predictions:
            self._predict(predictions, answers)
        if explanations:
            self._explain(explanations, answers)
        return answers

    def _predict(self, items: list[_Prediction], answers: list) -> None:
        """One forward pass for the group; if it fails, each request is retried alone so that only the failing one fails."""
        try:
            outputs = self.adapter.predict([item.model_input for item in items], [item.parsed.options for item in items])
        except Exception as error:  # noqa: BLE001
            if len(items) == 1:
                answers[items[0].position] = self._failure(error, items[0].request)
                return
            log.warning("a batch of %d predictions failed (%s: %s); retrying them one by one", len(items), type(error).__name__, error)
            for item in items:
                self._predict([item], answers)
            return
        for item, output in zip(items, outputs):
            try:
                body = self._encode_prediction(output, item.reply_type)
                hint = "ask for image/png or application/gzip" if item.reply_type in ("npz", "json", "max") else "send a smaller image"
                answers[item.position] = Reply(replies.check_reply_size(body, self.settings.max_response_bytes, hint), replies.CONTENT_TYPES[item.reply_type])
            except Exception as error:  # noqa: BLE001
                answers[item.position] = self._failure(error, item.request)

    def _encode_prediction(self, prediction: dict, reply_type: str) -> bytes:
        if reply_type == "png":
            return encode_png(self.adapter.prediction_png(prediction))
        if reply_type == "max":
            return encode_json(max_prediction(prediction))
        document_of = getattr(self.adapter, "prediction_document", None)
        return ENCODERS[reply_type](document_of(prediction, reply_type) if document_of else prediction)

    def _rule(self, options: dict) -> Rule:
        """The request's quadrature: `tolerance` (or the archive's default tolerance) refines the adaptive rule up
        to max_steps nodes; `n_steps` or a fixed `method` asks for a fixed rule. Options that contradict are a 400."""
        settings = self.settings
        fixed = "n_steps" in options or options.get("method", ADAPTIVE_METHOD) != ADAPTIVE_METHOD
        if "tolerance" in options and fixed:
            raise RequestError(
                f"'tolerance' refines the nested {ADAPTIVE_METHOD} rule until the completeness error is small enough; it cannot be "
                "combined with 'n_steps' or another 'method': send either 'tolerance' (and 'max_steps') or 'n_steps'/'method'"
            )
        tolerance = options.get("tolerance", None if fixed else settings.tolerance)
        if tolerance is None:
            if "max_steps" in options:
                raise RequestError("option 'max_steps' bounds a tolerance-driven explanation; send a 'tolerance' with it, or 'n_steps' alone")
            if options.get("method") == ADAPTIVE_METHOD:
                raise RequestError(f"method {ADAPTIVE_METHOD} refines until a 'tolerance' is met; send one (this archive has no default tolerance)")
            method, n_steps = options.get("method", settings.method), options.get("n_steps", settings.n_steps)
            if method == "riemann_trapezoid" and n_steps < 2:
                raise RequestError("option 'n_steps' must be at least 2 for method riemann_trapezoid")
            return make_rule(method, n_steps)
        return make_rule(tolerance=tolerance, max_steps=options.get("max_steps", settings.tolerance_max_steps))

    def _plan_explanation(self, position: int, request: IncomingRequest, parsed: ParsedRequest, reply_type: str) -> _Explanation:
        """Decode, plan and size-check one explanation request; its integral is computed with the batch's."""
        options, settings = parsed.options, self.settings
        rule = self._rule(options)
        model_input = self.adapter.prepare(parsed.image, options)
        plan = self.adapter.plan_explanation(model_input, options)
        baseline_kind = options.get("baseline", settings.baseline)
        seed_reply = parsed.seed_format and self.adapter.seed_explanation_keys is not None
        # The seed reply carries the path tensors, so a seed request keeps them unless it says return_path=false.
        keep_path = options.get("return_path", True if seed_reply else settings.return_path)
        most_steps = rule.max_steps if isinstance(rule, AdaptiveRule) else len(rule.alphas)
        replies.refuse_oversize_explanation(
            plan, model_input, most_steps, keep_path, reply_type, settings.max_response_bytes, seed_reply, "threshold" in self.adapter.options,
            hierarchy="idg_hierarchy" in options, steps_option="max_steps" if isinstance(rule, AdaptiveRule) else "n_steps",
        )
        problem = PathProblem(
            plan.path_target,
            model_input.tensor,
            self.adapter.baseline(model_input, baseline_kind),
            rule,
            internal_batch_size=options.get("internal_batch_size", settings.internal_batch_size),
            groups=plan.groups,
            keep_path=keep_path,
        )
        return _Explanation(position, request, parsed, model_input, plan, problem, baseline_kind, seed_reply, reply_type)

    def _explain(self, items: list[_Explanation], answers: list) -> None:
        """The batch's path integrals together (sharing chunks where their targets share a forward); if that fails,
        each is retried alone so that only the failing one fails."""
        try:
            integrals = integrate_paths([item.problem for item in items])
        except Exception as error:  # noqa: BLE001
            if len(items) == 1:
                answers[items[0].position] = self._failure(error, items[0].request)
                return
            log.warning("a batch of %d explanations failed (%s: %s); retrying them one by one", len(items), type(error).__name__, error)
            for item in items:
                item.problem.rule = item.problem.rule.fresh()
                self._explain([item], answers)
            return
        for item, integral in zip(items, integrals):
            try:
                answers[item.position] = self._explanation_reply(item, integral)
            except Exception as error:  # noqa: BLE001
                answers[item.position] = self._failure(error, item.request)

    def _explanation_reply(self, item: _Explanation, integral) -> Reply:
        payload = replies.explanation(integral, item.plan, item.model_input, item.baseline_kind)
        superpixels = item.parsed.options.get("idg_hierarchy")
        if superpixels is not None:
            segments = item.plan.groups if item.plan.groups_are_segments else None
            labels = item.plan.group_labels if item.plan.groups_are_segments else []
            payload["idg_hierarchy"] = segment_hierarchy(
                integral.integrated_grads, item.problem.inputs - item.problem.baseline, segments, labels,
                superpixel_image_of(item.model_input.tensor), superpixels,
            )
        if item.seed_reply:
            payload = replies.seed_explanation(payload, self.adapter.seed_explanation_keys)
        keep_path = item.problem.keep_path
        hint = "lower n_steps or send return_path=false" if keep_path else (
            "lower n_steps" if item.reply_type == "kserve_v2" else "lower n_steps or ask for application/gzip")
        return Reply(replies.check_reply_size(ENCODERS[item.reply_type](payload), self.settings.max_response_bytes, hint), replies.CONTENT_TYPES[item.reply_type])

    @staticmethod
    def _failure(error: Exception, request: IncomingRequest) -> Reply:
        """The reply for a request that failed: its own 4xx, 507 when memory ran out, else a logged 500."""
        if isinstance(error, RequestError):
            return Reply(encode_error(error.message), "application/json", error.status)
        if is_out_of_memory(error):
            log.warning("request %s ran out of memory: %s", request.request_id, error)
            message = "out of memory while serving this request; lower internal_batch_size or n_steps, or send a smaller image"
            return Reply(encode_error(message, request.request_id), "application/json", 507)
        log.exception("internal error while serving request %s", request.request_id)
        message = "internal error while serving this request; the server log has the details under its request_id"
        return Reply(encode_error(message, request.request_id), "application/json", 500)
