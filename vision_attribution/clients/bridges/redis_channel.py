"""The DEXTR seed's Redis mode: requests arrive on one channel, replies leave on another; TorchServe does the work.

  vision-attribution dextr-redis --redis_in IN --redis_out OUT [--redis_host H --redis_port P --redis_db D]
                                 [--threshold 0.5] [--workers 4] [--url ... --model dextr --token-file key_file.json]

Request (as the seed): {"image": "<base64 JPEG/PNG>", "points": [[x, y] x 4], "label": 1}. Reply (as the seed):
{"mask": "<base64 PNG>", "contours": [[[x, y], ...], ...], "meta": {"segmenter": {"type": "dextr"},
"prompt": {"points", "label"}}}. Unlike the seed, every request is answered: a failure publishes
{"error": "...", "status": HTTP status, "meta": {..., "prompt": {...}}} naming the problem. Requests are answered
concurrently (`--workers`), each as soon as it is done; the prompt in `meta` tells which request a reply answers.
When Redis goes away the bridge reconnects and subscribes again (pub/sub does not keep what was published while
nobody was subscribed), and a reply that cannot be published yet is retried until Redis is back.
"""
import argparse
import itertools
import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import redis

from ...formats.dextr import DEXTR_META
from .endpoint import EndpointUnavailable, PredictionEndpoint, add_endpoint_arguments, endpoint_from_arguments

log = logging.getLogger("vision_attribution.dextr_redis")
CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)  # seconds between attempts to reach Redis, the last one repeated


def error_reply(message: str, status: int, request: Any = None) -> dict:
    """The reply to a request that failed: what went wrong, the HTTP status it had, and the request's prompt."""
    prompt = {}
    if isinstance(request, dict):
        prompt = {"points": request.get("points"), "label": request.get("label", 1)}
    return {"error": message, "status": status, "meta": {**DEXTR_META, "prompt": prompt}}


class RedisBridge:
    """Subscribes to `channel_in`, sends each request to TorchServe, publishes each reply to `channel_out`."""

    def __init__(self, connection: dict, channel_in: str, channel_out: str, endpoint: PredictionEndpoint, threshold: Optional[float], workers: int):
        self.connection = connection
        self.channel_in, self.channel_out = channel_in, channel_out
        self.endpoint = endpoint
        self.threshold = threshold
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dextr-request")
        self.stopped = threading.Event()
        self.client = redis.Redis(**connection, socket_connect_timeout=5, health_check_interval=5)

    def answer(self, message: bytes) -> bytes:
        """The reply to one message: TorchServe's seed-format JSON as it came, or an error reply."""
        try:
            request = json.loads(message)
        except (ValueError, UnicodeDecodeError) as error:
            return json.dumps(error_reply(f"the request is not JSON: {error}", 400)).encode()
        if not isinstance(request, dict):
            return json.dumps(error_reply(f"the request must be a JSON object, got {type(request).__name__}", 400)).encode()
        if self.threshold is not None and "threshold" not in request:
            request = {**request, "threshold": self.threshold}
        try:
            reply = self.endpoint.predict(request)
        except EndpointUnavailable as error:
            return json.dumps(error_reply(str(error), error.status, request)).encode()
        if reply.status != 200:
            return json.dumps(error_reply(reply.error_message(), reply.status, request)).encode()
        return reply.body

    def handle(self, message: bytes) -> None:
        try:
            reply = self.answer(message)
        except Exception as error:  # noqa: BLE001 - whatever happens, the client gets a reply
            log.exception("request failed unexpectedly")
            reply = json.dumps(error_reply(f"internal error in the Redis bridge: {type(error).__name__}: {error}", 500)).encode()
        self.publish(reply)

    def publish(self, reply: bytes) -> None:
        """Publish, retrying while Redis is unreachable (until it is back or the bridge stops)."""
        for attempt in itertools.count():
            try:
                self.client.publish(self.channel_out, reply)
                return
            except CONNECTION_ERRORS as error:
                if self.stopped.is_set():
                    log.error("stopping: a reply could not be published (%s)", error)
                    return
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                log.warning("cannot publish a reply to Redis (%s); retrying in %.1f s", error, delay)
                self.stopped.wait(delay)

    def serve(self) -> None:
        """Listen until stopped; reconnect and subscribe again whenever the connection to Redis is lost."""
        failures = 0
        while not self.stopped.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel_in)
                log.info("listening on %s, replying on %s (Redis %s:%s db %s)", self.channel_in, self.channel_out,
                         self.connection["host"], self.connection["port"], self.connection["db"])  # fmt: skip
                failures = 0
                while not self.stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self.pool.submit(self.handle, message["data"])
            except CONNECTION_ERRORS as error:
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning("lost the connection to Redis (%s); reconnecting in %.1f s", error, delay)
                self.stopped.wait(delay)
            finally:
                try:
                    pubsub.close()
                except CONNECTION_ERRORS:
                    pass
        self.pool.shutdown(wait=True)

    def stop(self, *_) -> None:
        self.stopped.set()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis_host", default="localhost", help="the Redis server (default: %(default)s)")
    parser.add_argument("--redis_port", type=int, default=6379, help="its port (default: %(default)s)")
    parser.add_argument("--redis_db", type=int, default=0, help="its database (default: %(default)s)")
    parser.add_argument("--redis_in", required=True, help="the channel the requests arrive on")
    parser.add_argument("--redis_out", required=True, help="the channel the replies are published on")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight to TorchServe at once (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    add_endpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    connection = {"host": args.redis_host, "port": args.redis_port, "db": args.redis_db}
    bridge = RedisBridge(connection, args.redis_in, args.redis_out, endpoint_from_arguments(args), args.threshold, args.workers)
    signal.signal(signal.SIGTERM, bridge.stop)
    signal.signal(signal.SIGINT, bridge.stop)
    started = time.time()
    bridge.serve()
    log.info("stopped after %.0f s", time.time() - started)
    return 0
