"""The request pipeline shared by every archive, in three verbs: decode -> run -> encode.

decode turns requests into jobs (image decoded and prepared, options validated, explanations planned and
size-checked before any gradient); run computes them (a batch's predictions in one forward pass, its
explanations sharing chunks of path points); encode serialises each result in its reply type. It knows
nothing of TorchServe: the handler calls one verb per stage. A request that fails gets its own error reply
and the rest of its batch is served.
"""
import dataclasses
import logging
from typing import Any, Callable, Union

import numpy as np
import torch
from PIL import Image

from ..adapters.base import ModelAdapter, ModelInput
from ..attribution.baselines import UPLOADED_BASELINE, draw_baselines, noisy_inputs
from ..attribution.engine import integrate_paths, path_state_bytes
from ..attribution.path_sets import combine_paths
from ..attribution.scale_space import BlurPath
from ..attribution.guided_path import GuidedSpec
from ..attribution.xrai import candidate_bytes, over_segmentations, xrai
from ..attribution.idg_hierarchy import segment_hierarchy, superpixel_image_of
from ..formats import kserve_v2, replies
from ..formats.encode import encode_error, encode_gzip_torch, encode_json, encode_npz, encode_png
from ..formats.errors import RequestError
from ..formats.requests import ParsedRequest, parse_request
from ..formats.seed_apis import max_prediction
from .jobs import ExplanationJob, ExplanationSpec, IncomingRequest, Job, PathSetSpec, PredictionJob, Protocol, Reply, Result
from .options import PATH_OPTIONS, checks_for, refuse_explanation_options
from .payload import explanation_document, refuse_oversize_explanation, refuse_oversize_reply, steps_that_fit, xrai_document
from .settings import AttributionSettings

log = logging.getLogger(__name__)

ENCODERS = {"gzip": encode_gzip_torch, "npz": encode_npz, "json": encode_json, "opex": encode_json}
Outcome = Union[Job, Result, Reply]  # a stage's output per request: a reply once the request has failed


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
        self.checks = checks_for(PATH_OPTIONS + adapter.options, settings.limits)

    def handle_batch(self, requests: list[IncomingRequest]) -> list[Reply]:
        """One reply per request, in order: the three stages at once."""
        return self.encode(self.run(self.decode(requests)))

    # decode

    def decode(self, requests: list[IncomingRequest]) -> list[Union[Job, Reply]]:
        """One job per request, or the reply that refuses it."""
        outcomes: list[Union[Job, Reply]] = []
        for request in requests:
            kserve = request.kserve_v2_inputs is not None
            try:
                outcomes.append(self._job(request, kserve))
            except Exception as error:  # noqa: BLE001 - every failure becomes this request's reply
                outcomes.append(self._failure(error, request.request_id, Protocol.KSERVE_V2 if kserve else Protocol.NATIVE))
        return outcomes

    def _job(self, request: IncomingRequest, kserve: bool) -> Job:
        max_pixels = self.settings.limits.max_image_pixels
        if kserve:  # the protocol fixes the reply: v2 outputs
            parsed = kserve_v2.parse_inputs(request.kserve_v2_inputs, self.checks, max_pixels)
            protocol = Protocol.KSERVE_V2
        else:
            parsed = parse_request(request.fields, self.adapter.seed_layout, self.checks, max_pixels, request.header("content-type"))
            protocol = Protocol.SEED if parsed.seed_format else Protocol.NATIVE
        if request.explain:
            reply_type = "kserve_v2" if kserve else replies.negotiate_reply_type(request.header("accept"), "gzip", replies.EXPLANATION_TYPES)
            return self._explanation_job(request.request_id, protocol, reply_type, parsed)
        refuse_explanation_options(parsed.options, getattr(self.adapter, "predicts_targets", False))
        types = self.adapter.prediction_types
        default = "gzip" if protocol is Protocol.SEED and "gzip" in types else types[0]
        reply_type = "kserve_v2" if kserve else replies.negotiate_reply_type(request.header("accept"), default, types)
        return PredictionJob(request.request_id, protocol, reply_type, parsed.options, self.adapter.prepare(parsed.image, parsed.options))

    def _explanation_job(self, request_id: str, protocol: Protocol, reply_type: str, parsed: ParsedRequest) -> ExplanationJob:
        """Resolve, prepare, plan and size-check one explanation: a 413 comes before any gradient."""
        options, adapter = parsed.options, self.adapter
        seed_keys = adapter.seed_explanation_keys if protocol is Protocol.SEED else None
        spec = ExplanationSpec.resolve(options, self.settings, seed_reply=seed_keys is not None)
        model_input = adapter.prepare(parsed.image, options)
        plan = adapter.plan_explanation(model_input, options)
        pixel_maps = (spec.hierarchy_superpixels is not None) + 2 * spec.xrai
        if spec.rule.adaptive and "max_steps" not in options:  # the server's default must not fail a request: lower it to fit
            fitting = steps_that_fit(plan, model_input, spec.keep_path, reply_type, self.settings.max_response_bytes, pixel_maps, spec.paths.count)
            if spec.rule.least_max_steps <= fitting < spec.rule.max_steps:
                spec = dataclasses.replace(spec, rule=dataclasses.replace(spec.rule, max_steps=fitting), default_max_steps=spec.rule.max_steps)
                log.info("request %s: the default max_steps %d lowered to %d, which fits the response limit", request_id, spec.default_max_steps, fitting)
        refuse_oversize_explanation(
            plan, model_input, spec.rule.most_steps, spec.keep_path, reply_type, self.settings.max_response_bytes, seed_keys is not None,
            "threshold" in adapter.options, pixel_maps=pixel_maps,
            steps_option="max_steps" if spec.rule.adaptive else "n_steps", paths=spec.paths.count,
        )
        self._refuse_oversize_paths(spec, model_input)
        segmentations = self._xrai_segmentations(model_input) if spec.xrai else None
        path_inputs, path_baselines = self._path_ends(model_input, spec.paths, options)
        return ExplanationJob(request_id, protocol, reply_type, options, model_input, spec, plan, path_inputs, path_baselines, seed_keys, segmentations)

    def _xrai_segmentations(self, model_input: ModelInput) -> list[np.ndarray]:
        """XRAI's over-segmentations of the input (0.3 s), made first so that a 413 for its candidates' memory comes
        before any gradient."""
        segmentations, limit = over_segmentations(model_input.tensor), self.settings.limits.max_path_state_bytes
        size = tuple(model_input.tensor.shape[2:])
        needed = candidate_bytes(segmentations, size)
        if needed > limit:
            raise RequestError(
                f"XRAI's candidate regions over this {size[0]}x{size[1]} input would hold about {needed / 2**30:.2f} GiB, over this "
                f"archive's max_path_state_bytes of {limit / 2**30:.2f} GiB; send a smaller image or leave 'xrai' out",
                status=413,
            )
        return segmentations

    def _refuse_oversize_paths(self, spec: ExplanationSpec, model_input: ModelInput) -> None:
        """413 before any work when the paths' own state (accumulators, ends; Guided IG's float64 path) would pass the
        archive's max_path_state_bytes: on Linux a worker over its memory is killed rather than told."""
        guided, limit = isinstance(spec.rule, GuidedSpec), self.settings.limits.max_path_state_bytes
        state = path_state_bytes(model_input.tensor, spec.paths.count, guided)
        if state <= limit:
            return
        fitting = max(count for count in range(spec.paths.count + 1) if count == 0 or path_state_bytes(model_input.tensor, count, guided) <= limit)
        raise RequestError(
            f"the {spec.paths.count} paths of this explanation would hold about {state / 2**30:.2f} GiB beside their chunks "
            f"({'Guided IG, float64 ' if guided else ''}state over a {'x'.join(map(str, model_input.tensor.shape[1:]))} input), over this "
            f"archive's max_path_state_bytes of {limit / 2**30:.2f} GiB; "
            + (f"{fitting} path(s) fit, or a smaller image" if fitting else "send a smaller image"),
            status=413,
        )

    def _path_ends(self, model_input: ModelInput, paths: PathSetSpec, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the explanation's K paths end and start, (K, C, h, w) each; random draws from one generator seeded
        with the request's seed, baselines first."""
        inputs, generator = model_input.tensor, torch.Generator().manual_seed(paths.seed)
        if paths.blur_ig:
            return inputs, BlurPath(inputs, paths.max_sigma, paths.grad_step).start()
        if paths.baseline == UPLOADED_BASELINE:
            baselines = torch.cat([self._prepared_baseline(image, model_input, options) for image in options["baseline_image"]])
        else:
            mean_input = self.adapter.mean_input(model_input)
            baselines = draw_baselines(paths.baseline, inputs, self.adapter.value_scale, mean_input, paths.baselines, paths.sigma, generator)
        if paths.noise_samples:
            return noisy_inputs(inputs, paths.noise_stdev, paths.noise_samples, generator), baselines.expand(paths.noise_samples, -1, -1, -1)
        return inputs.expand_as(baselines), baselines

    def _prepared_baseline(self, image: np.ndarray, model_input: ModelInput, options: dict) -> torch.Tensor:
        """An uploaded baseline (H', W', 3) prepared exactly like the input, after a bilinear resize to the input
        image's size where it differs -> (1, C, h, w)."""
        height, width = model_input.image.shape[:2]
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        prepared = self.adapter.prepare(image, options).tensor
        if prepared.shape != model_input.tensor.shape:
            raise RequestError(f"the baseline image prepares to {tuple(prepared.shape[1:])}, the input to {tuple(model_input.tensor.shape[1:])}")
        return prepared

    # run

    def run(self, outcomes: list[Union[Job, Reply]]) -> list[Union[Result, Reply]]:
        """Compute every job: the predictions together, the explanations together (sharing chunks where their
        targets share a forward). Replies (refused requests) pass through."""
        results: list[Union[Result, Reply]] = list(outcomes)
        for kind, compute in ((PredictionJob, self._predict), (ExplanationJob, self._explain)):
            positions = [position for position, outcome in enumerate(outcomes) if isinstance(outcome, kind)]
            if positions:
                answers = self._together_or_alone([outcomes[position] for position in positions], compute)
                for position, answer in zip(positions, answers):
                    results[position] = answer
        return results

    def _together_or_alone(self, jobs: list[Job], compute: Callable[[list[Job]], list[Any]]) -> list[Union[Result, Reply]]:
        """compute(jobs) -> one document, or one exception, per job. If the group fails as a whole, each job is
        computed alone, so that only a failing job fails."""
        try:
            documents = compute(jobs)
        except Exception as error:  # noqa: BLE001
            if len(jobs) == 1:
                return [self._failure(error, jobs[0].request_id, jobs[0].protocol)]
            log.warning("a batch of %d jobs failed (%s: %s); computing them one by one", len(jobs), type(error).__name__, error)
            return [self._together_or_alone([job], compute)[0] for job in jobs]
        return [
            self._failure(document, job.request_id, job.protocol) if isinstance(document, Exception) else Result(job, document)
            for job, document in zip(jobs, documents)
        ]

    def _predict(self, jobs: list[PredictionJob]) -> list[dict]:
        return self.adapter.predict([job.model_input for job in jobs], [job.options for job in jobs])

    def _explain(self, jobs: list[ExplanationJob]) -> list[Union[dict, Exception]]:
        problems = [job.path_problems() for job in jobs]
        integrals = iter(integrate_paths([problem for job_problems in problems for problem in job_problems]))
        documents: list[Union[dict, Exception]] = []
        for job, job_problems in zip(jobs, problems):
            paths = [next(integrals) for _ in job_problems]
            try:
                documents.append(self._explanation_document(job, paths))
            except Exception as error:  # noqa: BLE001 - this job's failure alone
                documents.append(error)
        return documents

    def _explanation_document(self, job: ExplanationJob, paths: list) -> dict:
        """The reply document of one explanation from its K path integrals; XRAI's regions and the IDG hierarchy are
        built on the (combined) attribution and the mean of the paths' differences x_k - x'_k."""
        plan, spec = job.plan, job.spec
        combined = combine_paths(paths, spec.paths.noise_aggregation) if len(paths) > 1 else None
        document = explanation_document(paths, combined, plan, job.model_input, spec.paths.description(), spec.default_max_steps)
        attribution = paths[0].integrated_grads if combined is None else combined.attribution
        difference = (job.path_inputs - job.path_baselines).mean(0, keepdim=True)
        if spec.xrai:
            document["xrai"] = xrai_document(xrai(attribution, job.model_input.tensor, job.xrai_segmentations), attribution, difference)
        if spec.hierarchy_superpixels is not None:
            document["idg_hierarchy"] = segment_hierarchy(
                attribution, difference,
                plan.groups if plan.groups_are_segments else None, plan.group_labels if plan.groups_are_segments else [],
                superpixel_image_of(job.model_input.tensor), job.spec.hierarchy_superpixels,
            )  # fmt: skip
        if job.seed_keys is not None:
            document = replies.seed_explanation(document, job.seed_keys)
        return document

    # encode

    def encode(self, outcomes: list[Union[Result, Reply]]) -> list[Reply]:
        """Each result serialised in its job's reply type, within the server's response limit."""
        replies_: list[Reply] = []
        for outcome in outcomes:
            if isinstance(outcome, Reply):
                replies_.append(outcome)
                continue
            try:
                replies_.append(self._encode(outcome))
            except Exception as error:  # noqa: BLE001
                replies_.append(self._failure(error, outcome.job.request_id, outcome.job.protocol))
        return replies_

    def _encode(self, result: Result) -> Reply:
        job, limit = result.job, self.settings.max_response_bytes
        if isinstance(job, ExplanationJob):
            hint = "lower n_steps or send return_path=false" if job.spec.keep_path else (
                "lower n_steps" if job.reply_type == "kserve_v2" else "lower n_steps or ask for application/gzip")
        else:
            hint = "ask for image/png or application/gzip" if job.reply_type in ("npz", "json", "max") else "send a smaller image"
        if job.reply_type == "png":
            body = encode_png(self.adapter.prediction_png(result.document))
        elif job.reply_type == "max":
            body = encode_json(max_prediction(result.document))
        else:
            document = result.document
            document_of = getattr(self.adapter, "prediction_document", None)
            if isinstance(job, PredictionJob) and document_of is not None:
                document = document_of(document, job.reply_type)
            if job.reply_type == "kserve_v2":
                outputs = kserve_v2.outputs_of(document)
                size = kserve_v2.reply_bytes_over(outputs, limit)
                if size is not None:
                    refuse_oversize_reply(size, limit, hint)
                return Reply(200, replies.CONTENT_TYPES["kserve_v2"], protocol=job.protocol, outputs=outputs)
            body = ENCODERS[job.reply_type](document)
        refuse_oversize_reply(len(body), limit, hint)
        return Reply(200, replies.CONTENT_TYPES[job.reply_type], body, job.protocol)

    @staticmethod
    def _failure(error: Exception, request_id: str, protocol: Protocol) -> Reply:
        """The reply for a request that failed: its own 4xx, 507 when memory ran out, else a logged 500."""
        if isinstance(error, RequestError):
            return Reply(error.status, "application/json", encode_error(error.message), protocol, error=error.message)
        if is_out_of_memory(error):
            log.warning("request %s ran out of memory: %s", request_id, error)
            message, status = "out of memory while serving this request; lower internal_batch_size or n_steps, or send a smaller image", 507
        else:
            log.exception("internal error while serving request %s", request_id, exc_info=error)
            message, status = "internal error while serving this request; the server log has the details under its request_id", 500
        return Reply(status, "application/json", encode_error(message, request_id), protocol, error=f"{message} (request_id {request_id})")
