"""The request pipeline shared by every archive: decode -> model adapter -> attribution engine -> encode.

It knows nothing of TorchServe: the handler hands it plain request dicts and headers, and gets back one
Reply per request, so a bad request fails alone and the rest of its batch is served.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .adapter import ModelAdapter, ModelInput
from .encode import CONTENT_TYPES, check_reply_size, encode_error, encode_gzip_torch, encode_json, encode_npz, encode_png
from .engine import integrate_path
from .errors import RequestError
from .formats import Limits, ParsedRequest, negotiate_reply_type, parse_request

log = logging.getLogger(__name__)

EXPLANATION_TYPES = ("gzip", "npz", "json")
DEFAULT_RESPONSE_LIMIT = 6_553_500  # TorchServe's default max_response_size


@dataclass
class Settings:
    """Per-archive defaults and limits (the `handler:` section of model-config.yaml)."""

    n_steps: int = 50
    method: str = "gausslegendre"
    internal_batch_size: int = 16
    baseline: str = "zeros"
    return_path: bool = True
    max_response_bytes: int = DEFAULT_RESPONSE_LIMIT
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_config(cls, config: dict) -> "Settings":
        """Build from a dict such as model-config.yaml's `handler:` section; unknown keys are an error."""
        config = dict(config or {})
        limits = Limits(**{key: config.pop(key) for key in list(config) if key in Limits.__dataclass_fields__})
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown handler settings {sorted(unknown)}")
        return cls(limits=limits, **config)


@dataclass
class IncomingRequest:
    """One request of a batch: TorchServe's field dict, its headers, and whether it came to /explanations."""

    fields: dict
    headers: dict = field(default_factory=dict)
    explain: bool = False

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


def error_reply(error: RequestError) -> Reply:
    return Reply(encode_error(error.message), "application/json", error.status)


class AttributionService:
    """Serves one adapter: predictions for plain requests, path-integral explanations for explain requests."""

    def __init__(self, adapter: ModelAdapter, settings: Settings):
        self.adapter = adapter
        self.settings = settings

    def handle_batch(self, requests: list[IncomingRequest]) -> list[Reply]:
        """One reply per request, in order; predictions of the batch share one forward pass."""
        replies: list[Optional[Reply]] = [None] * len(requests)
        predictions: list[tuple[int, ParsedRequest, ModelInput, str]] = []
        for position, request in enumerate(requests):
            try:
                parsed = parse_request(request.fields, self.adapter.seed_layout, self.adapter.options, self.settings.limits)
                if request.explain:
                    reply_type = negotiate_reply_type(request.header("accept"), "gzip", EXPLANATION_TYPES)
                    replies[position] = self._explain(parsed, reply_type)
                else:
                    types = self.adapter.prediction_types
                    default = "gzip" if parsed.seed_format and "gzip" in types else types[0]
                    reply_type = negotiate_reply_type(request.header("accept"), default, types)
                    predictions.append((position, parsed, self.adapter.prepare(parsed.image, parsed.options), reply_type))
            except Exception as error:  # noqa: BLE001 - every failure becomes this request's reply
                replies[position] = self._failure(error)
        if predictions:
            self._predict(predictions, replies)
        return replies

    def _predict(self, items: list[tuple[int, ParsedRequest, ModelInput, str]], replies: list) -> None:
        try:
            outputs = self.adapter.predict([item[2] for item in items], [item[1].options for item in items])
        except Exception as error:  # noqa: BLE001 - the whole group failed: each request says why
            for position, *_ in items:
                replies[position] = self._failure(error)
            return
        for (position, _, _, reply_type), output in zip(items, outputs):
            try:
                if reply_type == "png":
                    body = encode_png(self.adapter.prediction_png(output))
                else:
                    body = self._encode(output, reply_type)
                replies[position] = Reply(check_reply_size(body, self.settings.max_response_bytes), CONTENT_TYPES[reply_type])
            except Exception as error:  # noqa: BLE001
                replies[position] = self._failure(error)

    def _explain(self, parsed: ParsedRequest, reply_type: str) -> Reply:
        options = parsed.options
        model_input = self.adapter.prepare(parsed.image, options)
        plan = self.adapter.plan_explanation(model_input, options)
        method = options.get("method", self.settings.method)
        n_steps = options.get("n_steps", self.settings.n_steps)
        baseline_kind = options.get("baseline", self.settings.baseline)
        seed_reply = parsed.seed_format and self.adapter.seed_explanation_keys is not None
        keep_path = True if seed_reply else options.get("return_path", self.settings.return_path)
        integral = integrate_path(
            plan.target_fn,
            model_input.tensor,
            self.adapter.baseline(model_input, baseline_kind),
            n_steps=n_steps,
            method=method,
            internal_batch_size=options.get("internal_batch_size", self.settings.internal_batch_size),
            groups=plan.groups,
            keep_path=keep_path,
        )
        payload: dict[str, Any] = {
            "integrated_grads": integral.integrated_grads,
            "step_sizes": integral.step_sizes.unsqueeze(1),
            "alphas": integral.alphas,
        }
        if keep_path:
            payload["integrated_directional_grads"] = integral.path_gradients
            payload["intermediates"] = integral.intermediates
        payload.update(plan.prediction)
        payload.update(
            target=plan.target,
            target_at_input=integral.target_at_input,
            target_at_baseline=integral.target_at_baseline,
            convergence_delta=integral.convergence_delta,
            method=method,
            n_steps=n_steps,
            baseline=baseline_kind,
            input_region=torch.tensor(model_input.region, dtype=torch.float64),
        )
        if plan.groups is not None:
            payload["idg_per_mask"] = {
                "idg": integral.idg,
                "dividends": integral.idg_dividends,
                "masks": plan.groups.cpu(),
                "labels": plan.group_labels,
            }
        if seed_reply:
            payload = {key: payload[key] for key in self.adapter.seed_explanation_keys}
        return Reply(check_reply_size(self._encode(payload, reply_type), self.settings.max_response_bytes), CONTENT_TYPES[reply_type])

    @staticmethod
    def _encode(payload: dict, reply_type: str) -> bytes:
        return {"gzip": encode_gzip_torch, "npz": encode_npz, "json": encode_json}[reply_type](payload)

    @staticmethod
    def _failure(error: Exception) -> Reply:
        if isinstance(error, RequestError):
            return error_reply(error)
        if isinstance(error, torch.OutOfMemoryError):
            return error_reply(RequestError(f"out of memory ({error}); lower internal_batch_size or send a smaller image", 507))
        log.exception("internal error while serving a request")
        return error_reply(RequestError(f"internal error: {type(error).__name__}: {error}", 500))
