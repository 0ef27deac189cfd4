"""TorchServe adapter shared by every archive: reads each request's own explain flag and headers,
hands the batch to vision_attribution's service, and writes each reply's status and content type."""
import logging
from pathlib import Path

import torch

from vision_attribution.service import AttributionService, IncomingRequest, Settings

log = logging.getLogger(__name__)


class AttributionHandler:
    """Subclasses set `load_adapter(model_dir, model_config, device) -> ModelAdapter`."""

    load_adapter = None

    def __init__(self):
        self.service = None
        self.initialized = False

    def initialize(self, context):
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        yaml_config = context.model_yaml_config or {}
        adapter = type(self).load_adapter(Path(properties["model_dir"]), yaml_config.get("model", {}), device)
        self.service = AttributionService(adapter, Settings.from_config(yaml_config.get("attribution", {})))
        self.initialized = True
        log.info("%s ready on %s", type(self).__name__, device)

    def handle(self, data, context):
        """data: one dict per request of the batch; returns one body per request."""
        requests = [
            IncomingRequest(
                fields=row,
                headers=context.get_all_request_header(index) or {},
                explain=context.get_request_header(index, "explain") == "True",
            )
            for index, row in enumerate(data)
        ]
        replies = self.service.handle_batch(requests)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, reply.content_type)
            if reply.status != 200:
                context.set_response_status(reply.status, "", index)
        return [reply.body for reply in replies]
