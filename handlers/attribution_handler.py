"""The TorchServe handler of every archive: the archive's archive.json names what it serves
(vision_attribution.archives); this adapter reads each request's own explain flag, headers and id,
hands the batch to the archive's service, and writes each reply's status and content type. Behind
TorchServe's kservev2 envelope it hands over the v2 inputs and returns v2 outputs (formats/kserve_v2.py)."""
import logging
import uuid
from pathlib import Path

import torch

from ts.utils.util import PredictionException

from vision_attribution.archives import load_service
from vision_attribution.formats import kserve_v2
from vision_attribution.service import IncomingRequest

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

    def handle(self, data, context):
        """data: one dict per request of the batch; returns one body per request."""
        if kserve_v2.from_envelope(context):
            return self.handle_kserve_v2(data, context)
        requests = [
            IncomingRequest(
                fields=row,
                headers=context.get_all_request_header(index) or {},
                explain=context.get_request_header(index, "explain") == "True",
                request_id=context.get_request_id(index) or str(uuid.uuid4()),
            )
            for index, row in enumerate(data)
        ]
        replies = self.service.handle_batch(requests)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, reply.content_type)
            if reply.status != 200:
                context.set_response_status(reply.status, "", index)
        return [reply.body for reply in replies]

    def handle_kserve_v2(self, inputs, context):
        """inputs: the v2 inputs of the batch's first request, as the envelope parsed them; returns one flat
        array per v2 output and names them through the envelope's context.input_names."""
        if len(context.request_ids) > 1:  # the envelope dropped the other requests: fail them all, loudly
            raise PredictionException(kserve_v2.BATCH_OF_ONE, 500)
        request = IncomingRequest(
            fields={},
            headers=context.get_all_request_header(0) or {},
            explain=context.get_request_header(0, "explain") == "True",
            request_id=context.get_request_id(0) or str(uuid.uuid4()),
            kserve_v2_inputs=inputs,
        )
        reply = self.service.handle_batch([request])[0]
        if reply.status != 200:
            raise PredictionException(kserve_v2.error_message(reply.body), reply.status)
        context.input_names, outputs = kserve_v2.envelope_outputs(reply.body)
        return outputs
