"""The bridges' side of TorchServe: POST one DEXTR request (native JSON) to /predictions/{model} with the token."""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

from ..worker_loss import is_worker_loss

UNAVAILABLE_STATUSES = (502, 503, 504)  # TorchServe has no worker or queue room now: retrying later may succeed


class EndpointUnavailable(Exception):
    """TorchServe did not answer (refused, timed out) or was unavailable (502/503/504): retrying later may succeed."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


@dataclass
class EndpointReply:
    status: int
    body: bytes

    def error_message(self) -> str:
        """The reason of a non-200 reply: our {"error"}, TorchServe's {"message"}, or the body's text."""
        try:
            document = json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")[:500]
        if isinstance(document, dict):
            return str(document.get("error") or document.get("message") or document)
        return str(document)


class PredictionEndpoint:
    """TorchServe's /predictions/{model}; `token` is the inference key (key_file.json), or None without token auth.
    A request TorchServe lost with its worker (worker_loss.py) is sent again, at most `retries` times."""

    def __init__(self, url: str, model: str, token: Optional[str], timeout: float, retries: int = 1):
        self.url = f"{url.rstrip('/')}/predictions/{model}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.retries = retries

    def predict(self, document: dict, accept: str = "application/json") -> EndpointReply:
        """POST `document` as JSON; any answer is returned, EndpointUnavailable when there is none to be had now."""
        headers = {**self.headers, "Content-Type": "application/json", "Accept": accept}
        body = json.dumps(document)
        for attempt in range(self.retries + 1):
            try:
                reply = requests.post(self.url, data=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as error:
                raise EndpointUnavailable(f"TorchServe at {self.url} did not answer: {error}") from error
            if attempt == self.retries or not is_worker_loss(reply.status_code, reply.content):
                break
        if reply.status_code in UNAVAILABLE_STATUSES:
            message = EndpointReply(reply.status_code, reply.content).error_message()
            raise EndpointUnavailable(f"TorchServe at {self.url} answered {reply.status_code}: {message}", reply.status_code)
        return EndpointReply(reply.status_code, reply.content)


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="TorchServe's inference address (default: %(default)s)")
    parser.add_argument("--model", default="dextr", help="the model name in TorchServe (default: %(default)s)")
    parser.add_argument("--token-file", type=Path, default=Path("key_file.json"), help="TorchServe's key file (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one prediction (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold of the mask and contours, as the seed's --threshold (default: %(default)s)")


def endpoint_from_arguments(args: argparse.Namespace) -> PredictionEndpoint:
    token = None
    if args.token_file.exists():
        token = json.loads(args.token_file.read_text())["inference"]["key"]
    return PredictionEndpoint(args.url, args.model, token, args.timeout)
