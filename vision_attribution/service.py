"""The request pipeline shared by every archive: decode -> model adapter -> attribution engine -> encode.

It knows nothing of TorchServe: the handler hands it plain request dicts and headers, and gets back one
Reply per request, so a bad request fails alone and the rest of its batch is served.
"""
import logging
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from .adapters.base import ModelAdapter, ModelInput
from .encode import encode_error, encode_gzip_torch, encode_json, encode_npz, encode_png
from .engine import integrate_path
from .errors import RequestError
from .formats import kserve_v2, replies
from .formats.requests import ParsedRequest, parse_request
from .formats.seed_apis import max_prediction
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
                    answers[position] = self._explain(parsed, reply_type)
                else:
                    types = self.adapter.prediction_types
                    default = "gzip" if parsed.seed_format and "gzip" in types else types[0]
                    reply_type = "kserve_v2" if request.kserve_v2_inputs is not None else (
                        replies.negotiate_reply_type(request.header("accept"), default, types))
                    predictions.append(_Prediction(position, request, parsed, self.adapter.prepare(parsed.image, parsed.options), reply_type))
            except Exception as error:  # noqa: BLE001 - every failure becomes this request's reply
                answers[position] = self._failure(error, request)
        if predictions:
            self._predict(predictions, answers)
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

    def _explain(self, parsed: ParsedRequest, reply_type: str) -> Reply:
        options, settings = parsed.options, self.settings
        model_input = self.adapter.prepare(parsed.image, options)
        plan = self.adapter.plan_explanation(model_input, options)
        method = options.get("method", settings.method)
        n_steps = options.get("n_steps", settings.n_steps)
        if method == "riemann_trapezoid" and n_steps < 2:
            raise RequestError("option 'n_steps' must be at least 2 for method riemann_trapezoid")
        baseline_kind = options.get("baseline", settings.baseline)
        seed_reply = parsed.seed_format and self.adapter.seed_explanation_keys is not None
        # The seed reply carries the path tensors, so a seed request keeps them unless it says return_path=false.
        keep_path = options.get("return_path", True if seed_reply else settings.return_path)
        limit = settings.max_response_bytes
        replies.refuse_oversize_explanation(plan, model_input, n_steps, keep_path, reply_type, limit, seed_reply, "threshold" in self.adapter.options)
        integral = integrate_path(
            plan.target_fn,
            model_input.tensor,
            self.adapter.baseline(model_input, baseline_kind),
            n_steps=n_steps,
            method=method,
            internal_batch_size=options.get("internal_batch_size", settings.internal_batch_size),
            groups=plan.groups,
            keep_path=keep_path,
        )
        payload = replies.explanation(integral, plan, model_input, method, baseline_kind)
        if seed_reply:
            payload = replies.seed_explanation(payload, self.adapter.seed_explanation_keys)
        hint = "lower n_steps or send return_path=false" if keep_path else (
            "lower n_steps" if reply_type == "kserve_v2" else "lower n_steps or ask for application/gzip")
        return Reply(replies.check_reply_size(ENCODERS[reply_type](payload), limit, hint), replies.CONTENT_TYPES[reply_type])

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
