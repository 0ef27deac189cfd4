"""The TorchServe handler of every archive, in TorchServe's own stages, each one verb of the core library
(vision_attribution.serving.service): preprocess decodes the batch's requests into jobs, inference runs them,
postprocess encodes each job's result and writes its status and content type. The archive's archive.json names
what it serves (vision_attribution.archives). Behind TorchServe's kservev2 envelope the handler hands over the
v2 inputs and returns the v2 outputs (vision_attribution/formats/kserve_v2.py)."""
import logging
import uuid
from pathlib import Path

import torch

from ts.utils.util import PredictionException

from vision_attribution.archives import load_service
from vision_attribution.formats import kserve_v2
from vision_attribution.serving.jobs import IncomingRequest, Protocol

log = logging.getLogger(__name__)


class AttributionHandler:
    def __init__(self):
        self.service = None
        self.initialized = False

    def initialize(self, context):
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        self.service = load_service(Path(properties["model_dir"]), context.model_yaml_config, device)
        self.initialized = True
        log.info("%s ready on %s", context.model_name, device)

    def preprocess(self, data, context) -> list:
        """data: one dict per request of the batch, or behind the kservev2 envelope the v2 inputs of its one
        request -> one decoded job (or the reply refusing it) per request."""
        envelope = kserve_v2.from_envelope(context)
        if envelope and len(context.request_ids) > 1:  # the envelope dropped the other requests: fail them all, loudly
            raise PredictionException(kserve_v2.BATCH_OF_ONE, 500)
        requests = [
            IncomingRequest(
                fields={} if envelope else row,
                headers=context.get_all_request_header(index) or {},
                explain=context.get_request_header(index, "explain") == "True",
                request_id=context.get_request_id(index) or str(uuid.uuid4()),
                kserve_v2_inputs=data if envelope else None,
            )
            for index, row in enumerate([None] if envelope else data)
        ]
        return self.service.decode(requests)

    def inference(self, jobs: list, context) -> list:
        """The batch's predictions in one forward pass, its explanations sharing chunks of path points."""
        return self.service.run(jobs)

    def postprocess(self, results: list, context) -> list:
        """One body per request, with its status and content type; a KServe v2 reply's flat output arrays, named
        through the envelope's context.input_names."""
        replies = self.service.encode(results)
        if replies[0].protocol is Protocol.KSERVE_V2:  # the envelope's batch of one
            reply = replies[0]
            if reply.status != 200:
                raise PredictionException(reply.error, reply.status)
            context.input_names = [output.name for output in reply.outputs]
            return [output.data for output in reply.outputs]
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, reply.content_type)
            if reply.status != 200:
                context.set_response_status(reply.status, "", index)
        return [reply.body for reply in replies]

    def handle(self, data, context):
        return self.postprocess(self.inference(self.preprocess(data, context), context), context)
