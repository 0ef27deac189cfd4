"""An archive's settings: its model-config.yaml, validated when the archive is built and when a worker starts.

model-config.yaml holds TorchServe's own keys (workers, batching, timeouts) plus two sections of ours:
  attribution:  defaults and limits of explanations, the same for every archive (ATTRIBUTION_SETTINGS);
  model:        the archive's own settings (each archive module's MODEL_SETTINGS).
A misspelt key or a value outside what is allowed is a ConfigError that names the key and the allowed values.
"""
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..attribution.baselines import DETERMINISTIC_BASELINES, RANDOM_BASELINES
from ..attribution.quadrature import ADAPTIVE_MIN_STEPS, METHODS, RuleSpec, TooFewSteps
from ..formats import values

DEFAULT_BASELINES = DETERMINISTIC_BASELINES + RANDOM_BASELINES
"""The baselines an archive may explain from by default (attribution/baselines.py); an uploaded image is per request."""

TORCHSERVE_KEYS = frozenset({
    "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout", "deviceType",
    "deviceIds", "parallelLevel", "parallelType", "torchrun", "jobQueueSize", "useJobTicket", "maxRetryTimeoutInSec",
    "clientTimeoutInMills", "continuousBatching", "sequenceBatching", "sequenceMaxIdleMSec", "sequenceTimeoutMSec",
    "maxNumSequence", "maxSequenceJobQueueSize", "asyncCommunication", "useVenv",
})  # fmt: skip
"""The keys TorchServe 0.12 itself reads from model-config.yaml."""

TORCHSERVE_DEFAULT_RESPONSE_LIMIT = 6_553_500  # TorchServe's default max_response_size


class ConfigError(ValueError):
    """An archive's model-config.yaml is not valid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Setting:
    """One configurable value: its check (raw value -> parsed value, ValueError otherwise) and default."""

    check: values.Check
    default: Any
    help: str


@dataclass(frozen=True)
class Limits:
    """Per-archive bounds on what one request may ask for."""

    max_steps: int = 1024
    max_internal_batch_size: int = 512
    max_image_pixels: int = 36_000_000
    max_paths: int = 64
    max_path_state_bytes: int = 2 * 2**30


@dataclass(frozen=True)
class AttributionSettings:
    """The `attribution:` section: each explanation option's default, and the limits of one request."""

    n_steps: int = 50
    method: str = "gausslegendre"
    tolerance: Optional[float] = None
    tolerance_max_steps: int = 257
    internal_batch_size: int = 16
    baseline: str = "zeros"
    return_path: bool = False
    max_response_bytes: int = TORCHSERVE_DEFAULT_RESPONSE_LIMIT
    limits: Limits = Limits()


ATTRIBUTION_SETTINGS: dict[str, Setting] = {
    "n_steps": Setting(values.integer(1, 100_000), 50, "path steps of an explanation"),
    "method": Setting(values.choice(*METHODS), "gausslegendre", "quadrature rule of fixed-step explanations"),
    "tolerance": Setting(values.optional(values.number(1e-6, 1.0)), None,
                         "default relative completeness tolerance (adaptive rule); null: n_steps of `method`"),
    "tolerance_max_steps": Setting(values.integer(ADAPTIVE_MIN_STEPS, 100_000), 257, "default max_steps of a tolerance-driven explanation (at most max_steps)"),
    "internal_batch_size": Setting(values.integer(1, 100_000), 16, "path points per forward/backward chunk"),
    "baseline": Setting(values.choice(*DEFAULT_BASELINES), "zeros", "the path's starting point"),
    "return_path": Setting(values.boolean, False, "also return the path gradients and path points"),
    "max_response_bytes": Setting(values.integer(1024), TORCHSERVE_DEFAULT_RESPONSE_LIMIT, "equal to config.properties' max_response_size"),
    "max_steps": Setting(values.integer(1, 100_000), 1024, "largest n_steps a request may ask for"),
    "max_internal_batch_size": Setting(values.integer(1, 100_000), 512, "largest internal_batch_size a request may ask for"),
    "max_image_pixels": Setting(values.integer(1), 36_000_000, "largest image (width x height) a request may send"),
    "max_paths": Setting(values.integer(1, 4096), 64, "most paths (baselines or noise samples) of one explanation"),
    "max_path_state_bytes": Setting(values.integer(1), 2 * 2**30, "most memory the paths of one explanation may hold beside their chunks"),
}


def _section(config: Mapping, name: str) -> dict:
    section = config.get(name)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"model-config '{name}:' must be a mapping of settings, got {section!r}")
    return dict(section)


def read_section(section: Mapping, schema: Mapping[str, Setting], name: str) -> dict[str, Any]:
    """Every setting of `schema`, from `section` where given (checked) or its default."""
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise ConfigError(f"model-config '{name}:' has unknown key(s) {unknown}; allowed keys are {sorted(schema)}")
    parsed = {}
    for key, setting in schema.items():
        if key not in section:
            parsed[key] = setting.default
            continue
        try:
            parsed[key] = setting.check(section[key])
        except ValueError as error:
            raise ConfigError(f"model-config '{name}.{key}' {error}") from None
    return parsed


def read_model_config(config: Mapping | None, model_settings: Mapping[str, Setting]) -> tuple[AttributionSettings, dict[str, Any]]:
    """Validate a whole model-config (as loaded from YAML): TorchServe keys, `attribution:` and `model:`."""
    config = dict(config or {})
    unknown = sorted(set(config) - TORCHSERVE_KEYS - {"attribution", "model"})
    if unknown:
        raise ConfigError(
            f"model-config has unknown top-level key(s) {unknown}; allowed are TorchServe's keys "
            f"{sorted(TORCHSERVE_KEYS)} and the sections 'attribution' and 'model'"
        )
    section = _section(config, "attribution")
    raw = read_section(section, ATTRIBUTION_SETTINGS, "attribution")
    limits = Limits(**{key: raw.pop(key) for key in Limits.__dataclass_fields__})
    if "tolerance_max_steps" not in section:  # the default follows a lower max_steps
        raw["tolerance_max_steps"] = min(raw["tolerance_max_steps"], limits.max_steps)
    attribution = AttributionSettings(limits=limits, **raw)
    if attribution.n_steps > limits.max_steps:
        raise ConfigError(f"model-config 'attribution.n_steps' ({attribution.n_steps}) is over 'attribution.max_steps' ({limits.max_steps})")
    if attribution.tolerance_max_steps > limits.max_steps:
        raise ConfigError(
            f"model-config 'attribution.tolerance_max_steps' ({attribution.tolerance_max_steps}) is over 'attribution.max_steps' ({limits.max_steps})"
        )
    if attribution.internal_batch_size > limits.max_internal_batch_size:
        raise ConfigError(
            f"model-config 'attribution.internal_batch_size' ({attribution.internal_batch_size}) is over "
            f"'attribution.max_internal_batch_size' ({limits.max_internal_batch_size})"
        )
    try:
        RuleSpec(attribution.method, attribution.n_steps)
    except TooFewSteps as error:
        raise ConfigError(f"model-config 'attribution.n_steps' {error.requirement}") from None
    return attribution, read_section(_section(config, "model"), model_settings, "model")
