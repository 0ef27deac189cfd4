"""The gateway's side of TorchServe: POST with the inference token, stream the reply back, and say why when
TorchServe cannot answer (503 unreachable or refusing the gateway's key, 504 too slow).

TorchServe writes its keys to key_file.json where it was started; the inference key expires after
`token_expiration_min` (60 minutes by default). The gateway re-reads the file whenever it changes and, shortly
before the key expires, asks TorchServe's management API for a new one (`GET /token?type=inference` with the
file's API key), which TorchServe writes back to the file.
"""
import asyncio
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Optional

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..worker_loss import is_worker_loss

log = logging.getLogger(__name__)

RENEW_BEFORE = timedelta(seconds=30)
PASSED_HEADERS = ("content-type", "content-length", "x-request-id")
"""Reply headers passed from TorchServe to the client."""


class GatewayError(Exception):
    """TorchServe could not be asked or did not answer: becomes `status` with {"error": reason}."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class InferenceKey:
    """TorchServe's inference key from its key_file.json, re-read when the file changes, renewed before it expires."""

    def __init__(self, key_file: Path, management_url: Optional[str]):
        self.key_file = key_file
        self.management_url = management_url.rstrip("/") if management_url else None
        self._stamp: Optional[tuple[int, int]] = None
        self._keys: dict = {}
        self._renewing = asyncio.Lock()

    def _read(self) -> dict:
        try:
            status = self.key_file.stat()
            stamp = (status.st_mtime_ns, status.st_size)
            if stamp != self._stamp:
                self._keys, self._stamp = json.loads(self.key_file.read_text()), stamp
        except (OSError, ValueError) as error:
            raise GatewayError(503, f"cannot read TorchServe's key file {self.key_file}: {error}") from error
        return self._keys

    def _expires(self, keys: dict) -> Optional[datetime]:
        try:
            return datetime.fromisoformat(keys["inference"]["expiration time"])
        except (KeyError, TypeError, ValueError):
            return None

    async def current(self, http: httpx.AsyncClient) -> str:
        """The inference key to send now, renewed first when it expires within RENEW_BEFORE."""
        keys = self._read()
        expires = self._expires(keys)
        if expires is not None and self.management_url and expires - RENEW_BEFORE <= datetime.now(timezone.utc):
            async with self._renewing:
                keys = self._read()
                expires = self._expires(keys)
                if expires is not None and expires - RENEW_BEFORE <= datetime.now(timezone.utc):
                    await self._renew(http, keys)
                    keys = self._read()
        try:
            return keys["inference"]["key"]
        except (KeyError, TypeError) as error:
            raise GatewayError(503, f"TorchServe's key file {self.key_file} has no inference key") from error

    async def _renew(self, http: httpx.AsyncClient, keys: dict) -> None:
        url = f"{self.management_url}/token?type=inference"
        try:
            reply = await http.get(url, headers={"Authorization": f"Bearer {keys['API']['key']}"})
        except (KeyError, TypeError) as error:
            raise GatewayError(503, f"TorchServe's key file {self.key_file} has no API key to renew the expiring inference key") from error
        except httpx.TransportError as error:
            raise GatewayError(503, f"the inference key expires and TorchServe's management API at {self.management_url} is not reachable to renew it: {error!r}") from error
        if reply.status_code != 200:
            raise GatewayError(503, f"the inference key expires and TorchServe refused to renew it ({reply.status_code}: {reply.text.strip()})")
        log.info("renewed TorchServe's inference key (%s)", self.key_file)


class TorchServeClient:
    """POSTs to TorchServe's inference API with the token; every call has connect, read and write timeouts. A
    request TorchServe lost with its worker (worker_loss.py) is sent again, at most `retries` times."""

    def __init__(self, inference_url: str, key: InferenceKey, timeout: float, connect_timeout: float = 5.0, retries: int = 1):
        self.inference_url = inference_url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.retries = retries
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=connect_timeout), limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def close(self) -> None:
        await self.http.aclose()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST `body` to TorchServe at `path`; its reply (status, type, body) streams through unchanged."""
        for attempt in range(self.retries + 1):
            try:
                upstream = await self._send(path, body, headers)
            except GatewayError as error:
                return JSONResponse({"error": error.reason}, status_code=error.status)
            passed = {name: upstream.headers[name] for name in PASSED_HEADERS if name in upstream.headers}
            if upstream.status_code < 400:
                return StreamingResponse(self._relay(upstream), status_code=upstream.status_code, headers=passed)
            try:  # errors are small JSON documents
                reply_body = await upstream.aread()
            finally:
                await upstream.aclose()
            if attempt == self.retries or not is_worker_loss(upstream.status_code, reply_body):
                break
            log.warning("TorchServe lost %s with its worker (%s %s): sending it again", path, upstream.status_code, reply_body[:200])
        if upstream.status_code == 400 and self._is_key_refusal(reply_body):
            reason = f"TorchServe refused the gateway's inference key, read from {self.key.key_file}: is it the key_file.json of the TorchServe at {self.inference_url}?"
            return JSONResponse({"error": reason}, status_code=503)
        return Response(reply_body, status_code=upstream.status_code, headers=passed)

    async def _send(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        headers = {**headers, "Authorization": f"Bearer {await self.key.current(self.http)}"}
        url = f"{self.inference_url}{path}"
        try:
            return await self.http.send(self.http.build_request("POST", url, content=body, headers=headers), stream=True)
        except httpx.ConnectTimeout as error:
            raise GatewayError(503, f"TorchServe at {self.inference_url} is not reachable: connecting timed out") from error
        except httpx.TimeoutException as error:
            raise GatewayError(504, f"TorchServe did not answer within {self.timeout:g} s ({type(error).__name__})") from error
        except httpx.TransportError as error:
            raise GatewayError(503, f"TorchServe at {self.inference_url} is not reachable: {error!r}") from error

    @staticmethod
    def _is_key_refusal(body: bytes) -> bool:
        """TorchServe's own 400 for a missing, wrong or expired token (not the client's fault)."""
        try:
            return json.loads(body).get("type") == "InvalidKeyException"
        except (ValueError, AttributeError):
            return False

    @staticmethod
    async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()
