"""TorchServe's replies to a request it lost with its worker, which is safe to send again.

While workers are scaled down, or when one dies (killed, out of memory) during a batch, TorchServe fails the
requests that worker held with its own JSON {"code", "type", "message"}: 500 "Worker scaled down." or 507/500
"Worker died." (507 when it has already reaped the worker). Predictions and explanations have no side effects,
so the client, the bridges and the gateway send such a request once more (another worker, or the restarted one,
serves it). Only these replies are: the handler's own errors ({"error"}) and 4xx are answers. Standard library
only: the gateway imports it without torch or requests.
"""
import json

WORKER_LOSS_MESSAGES = ("Worker died.", "Worker scaled down.")  # TorchServe's own messages when it loses a worker
WORKER_LOSS_STATUSES = (500, 507)


def is_worker_loss(status: int, body: bytes) -> bool:
    """Whether a reply (status, body) is TorchServe failing the request because its worker died or was scaled down."""
    if status not in WORKER_LOSS_STATUSES:
        return False
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and document.get("message") in WORKER_LOSS_MESSAGES
