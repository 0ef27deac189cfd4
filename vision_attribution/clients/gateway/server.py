"""The gateway process: MAX Image Segmenter's API on one port, each Flask seed's POST /model/ on a port of its
own (so that a seed's client needs only the host and port changed), all in one uvicorn server.

    vision-attribution gateway --torchserve http://127.0.0.1:8080 --key-file key_file.json [--port 5000]
        [--seed bit=8888 --seed tensormask=8889:MODEL ...] [--host 127.0.0.1] [--max-model deeplab] ...
"""
import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import os
import quopri
import socket
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ...formats.seed_apis import FLASK_SEEDS, MAX_INVALID_IMAGE, MAX_METADATA, MAX_MISSING_IMAGE, MAX_PREDICTION_TYPE, max_labels
from . import swagger
from .connections import ConnectionLimits, serve_on
from .torchserve import InferenceKey, TorchServeClient

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20  # config.properties' max_request_size
IGNORED_HEADER = "X-Ignored-Fields"
"""Names, on a seed's own route, what the client sent and the seed's API ignored: `form:NAME` for a form field,
`query:NAME` for a query-string parameter (also logged)."""
MAX_OPTIONS = ("image_size",)
"""Form fields of POST /model/predict that go on to the archive (MAX fixed image_size at start; here per request)."""


@dataclass(frozen=True)
class SeedPort:
    """A Flask seed served on its own port: `seed` (a FLASK_SEEDS key) answered by TorchServe model `model`."""

    seed: str
    port: int
    model: str


def _forwarded_headers(request: Request, **fixed: str) -> dict[str, str]:
    """The client's Content-Type and Accept (what TorchServe's handler reads), overridden by `fixed`."""
    headers = {name: request.headers[name] for name in ("content-type", "accept") if name in request.headers}
    headers.update({name.replace("_", "-"): value for name, value in fixed.items()})
    return headers


def image_type(data: bytes) -> str | None:
    """MAX's test, PIL can open it (its header; pixels are decoded by the archive, which checks their number): the
    image's MIME type, or None for what is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.get_format_mimetype() or "application/octet-stream"
    except Image.DecompressionBombError:
        return "application/octet-stream"  # an image, too large: the archive refuses it with 413 and says so
    except Exception:  # noqa: BLE001 - whatever PIL cannot open is "not a valid image", as MAX said
        return None


def part_bytes(upload: UploadFile, data: bytes) -> bytes:
    """A multipart file's bytes, its Content-Transfer-Encoding (RFC 2045: base64, quoted-printable) undone, which the
    form parser leaves in place. HTTPException 400 for an encoding that cannot be undone."""
    encoding = upload.headers.get("content-transfer-encoding", "binary").strip().lower()
    if encoding in ("binary", "8bit", "7bit"):
        return data
    try:
        if encoding == "base64":
            return base64.b64decode(data, validate=False)
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except binascii.Error as error:
        raise HTTPException(400, f"the 'image' part is not valid base64 (Content-Transfer-Encoding: base64): {error}") from None
    raise HTTPException(400, f"the 'image' part has Content-Transfer-Encoding {encoding!r}; send it as binary, base64 or quoted-printable")


def ignored_query(request: Request) -> list[str]:
    """The query-string parameters of a seed route (the seeds read none)."""
    return [f"query:{name}" for name in dict.fromkeys(request.query_params.keys())]


def naming_ignored(response: Response, ignored: list[str], route: str) -> Response:
    """`response` with what the seed's API ignored named in IGNORED_HEADER, and logged."""
    if ignored:
        response.headers[IGNORED_HEADER] = ", ".join(ignored)
        log.info("%s: ignored what the seed's API ignores: %s", route, ", ".join(ignored))
    return response


def refuse_content_encoding(content_encoding: str, reads: str) -> None:
    """HTTPException 400 for a compressed body: the seeds' servers read `reads` uncompressed."""
    if content_encoding.strip().lower() not in ("", "identity"):
        raise HTTPException(400, f"the body is sent with Content-Encoding {content_encoding!r}; this seed's API reads {reads} "
                                 "uncompressed: send it without Content-Encoding")  # fmt: skip


def seed_json(body: bytes, content_encoding: str, content_type: str = "") -> bytes:
    """A Flask seed's JSON body as UTF-8, the way Flask's get_json read it (UTF-8 with or without a BOM, UTF-16 and
    UTF-32, found by json.detect_encoding). HTTPException 400 for a compressed body, which Flask did not decompress,
    and for a body labelled JSON that is not JSON in the encoding its first bytes show; a body not labelled JSON that
    is not JSON in that encoding goes on unchanged (the archive decides what it is: an image, say)."""
    refuse_content_encoding(content_encoding, "its JSON")
    encoding = json.detect_encoding(body[:4])
    if encoding == "utf-8":
        return body
    try:
        text = body.decode(encoding)
        json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        if content_type.split(";")[0].strip().lower() == "application/json":
            raise HTTPException(400, f"the body is labelled JSON and its first bytes show {encoding.upper()}, but it is not valid JSON "
                                     f"in {encoding.upper()}: {str(error)[:200]}") from None  # fmt: skip
        return body
    return text.encode("utf-8")


def _documentation_routes(spec: dict) -> list[Route]:
    async def page(request: Request) -> Response:
        return HTMLResponse(swagger.ui_page(spec["info"]["title"]))

    async def description(request: Request) -> Response:
        return JSONResponse(spec)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in swagger.UI_ASSETS:
            raise HTTPException(404, f"no such file: {name}")
        return FileResponse(swagger.UI_ASSETS_DIR / name)

    return [Route("/", page), Route("/swagger.json", description), Route("/swagger-ui/{name}", asset)]


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


def _app(routes: list[Route], cors: bool) -> Starlette:
    middleware = [Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], expose_headers=[IGNORED_HEADER])] if cors else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})


def max_app(torchserve: TorchServeClient, model: str, cors: bool) -> Starlette:
    """MAX Image Segmenter's routes; POST /model/predict is answered by TorchServe's /predictions/{model}."""

    async def metadata(request: Request) -> Response:
        return JSONResponse(MAX_METADATA)

    async def labels(request: Request) -> Response:
        return JSONResponse(max_labels())

    async def predict(request: Request) -> Response:
        """MAX read the file `image` and nothing else: other form fields and the query string are ignored (and named),
        but for MAX_OPTIONS. TorchServe gets a multipart form the gateway builds: the image's bytes with its own type.
        A compressed body (Content-Encoding), which MAX's Flask did not decompress either, is a 400 that says so."""
        refuse_content_encoding(request.headers.get("content-encoding", ""), "a multipart form")
        async with request.form() as form:
            images = [value for value in form.getlist("image") if isinstance(value, UploadFile)]
            if not images:
                return JSONResponse(MAX_MISSING_IMAGE, status_code=400)
            if len(images) > 1:
                raise HTTPException(400, f"the form holds {len(images)} 'image' files; send one image per request")
            data = part_bytes(images[0], await images[0].read())
            mime_type = image_type(data)
            if mime_type is None:
                return JSONResponse(MAX_INVALID_IMAGE, status_code=400)
            options: dict[str, str] = {}
            for name, value in form.multi_items():
                if name in MAX_OPTIONS:
                    if name in options or not isinstance(value, str):
                        raise HTTPException(400, f"send the form field {name!r} once, as text")
                    options[name] = value
            ignored = [f"form:{name}" for name in dict.fromkeys(form.keys()) if name != "image" and name not in MAX_OPTIONS]
        built = httpx.Request("POST", "http://torchserve", files={"image": (images[0].filename or "image", data, mime_type)}, data=options)
        headers = {"content-type": built.headers["content-type"], "accept": MAX_PREDICTION_TYPE}
        response = await torchserve.post(f"/predictions/{model}", built.read(), headers)
        return naming_ignored(response, ignored + ignored_query(request), "POST /model/predict")

    routes = [Route("/model/metadata", metadata), Route("/model/labels", labels), Route("/model/predict", predict, methods=["POST"])]
    return _app(routes + _documentation_routes(swagger.max_spec()), cors)


def seed_app(torchserve: TorchServeClient, seed: SeedPort, cors: bool) -> Starlette:
    """A Flask seed's POST /model/: its JSON body goes to TorchServe (as UTF-8, see seed_json), the seed reply comes
    back unchanged; the query string, which the seeds never read, is ignored and named."""
    path = f"/{FLASK_SEEDS[seed.seed][1]}/{seed.model}"

    async def model(request: Request) -> Response:
        body = seed_json(await request.body(), request.headers.get("content-encoding", ""), request.headers.get("content-type", ""))
        response = await torchserve.post(path, body, _forwarded_headers(request))
        return naming_ignored(response, ignored_query(request), f"POST /model/ ({seed.seed})")

    try:
        package_version = version("vision-attribution")
    except PackageNotFoundError:
        package_version = "0"
    return _app([Route("/model/", model, methods=["POST"])] + _documentation_routes(swagger.seed_spec(seed.seed, seed.model, package_version)), cors)


class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, from its Content-Length before anything is read,
    or as soon as the streamed body passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the upload is over this gateway's limit of {self.max_bytes} bytes (--max-upload-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"error": self._message()}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())  # raised inside the endpoint: its app answers 413
            return message

        await self.app(scope, limited_receive, send)


class PortDispatch:
    """One ASGI app for several listening sockets: each request goes to the app of the port it came in on. A client
    that disconnects before its request is read is logged in one line, not as a server error."""

    def __init__(self, apps_by_port: dict[int, object]):
        self.apps_by_port = apps_by_port

    async def __call__(self, scope, receive, send):
        try:
            await self.apps_by_port[scope["server"][1]](scope, receive, send)
        except ClientDisconnect:
            client = "%s:%s" % tuple(scope.get("client") or ("?", "?"))
            log.info("%s %s: the client %s disconnected before its request was read", scope.get("method"), scope.get("path"), client)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, reuse_port=False)
    sock.set_inheritable(True)
    return sock


def default_management_url(inference_url: str) -> str:
    """TorchServe's management API next to its inference API: the same host, port 8081 (config.properties)."""
    parts = urlsplit(inference_url)
    return urlunsplit((parts.scheme, f"{parts.hostname}:8081", "", "", ""))


def parse_seed(text: str) -> SeedPort:
    """SEED=PORT or SEED=PORT:MODEL (the TorchServe model name, default SEED)."""
    seed, separator, rest = text.partition("=")
    port, _, model = rest.partition(":")
    if not separator or seed not in FLASK_SEEDS or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected SEED=PORT[:MODEL] with SEED one of {', '.join(FLASK_SEEDS)}; got {text!r}")
    return SeedPort(seed, int(port), model or seed)


async def serve(args: argparse.Namespace) -> None:
    key = InferenceKey(args.key_file, args.management or default_management_url(args.torchserve))
    torchserve = TorchServeClient(args.torchserve, key, args.timeout)
    cors = args.cors or os.environ.get("CORS_ENABLE") == "true"
    served = [("MAX Image Segmenter", args.port, max_app(torchserve, args.max_model, cors))]
    served += [(f"seed {seed.seed} (TorchServe model {seed.model})", seed.port, seed_app(torchserve, seed, cors)) for seed in args.seed]
    ports = [port for _, port, _ in served if port != 0]
    if len(set(ports)) != len(ports):
        raise SystemExit("vision-attribution gateway: every --seed needs a port of its own, other than --port")
    sockets, apps = [], {}
    for label, port, app in served:
        sockets.append(listening_socket(args.host, port))
        apps[sockets[-1].getsockname()[1]] = UploadLimit(app, args.max_upload_mb * 2**20)
        log.info("%s on http://%s:%d", label, args.host, sockets[-1].getsockname()[1])
    limits = ConnectionLimits(args.head_timeout, args.body_timeout, args.keep_alive_timeout, args.max_head_kb * 2**10)
    try:
        await serve_on(PortDispatch(apps), sockets, limits, args.log_level)
    finally:
        await torchserve.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--torchserve", default="http://127.0.0.1:8080", help="TorchServe's inference API (http://127.0.0.1:8080)")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key_file.json (written where it was started)")
    parser.add_argument("--management", help="TorchServe's management API, used to renew the inference key (default: the --torchserve host, port 8081)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=5000, help="port of MAX Image Segmenter's API and its Swagger UI (5000, MAX's)")
    parser.add_argument("--max-model", default="deeplab", help="the TorchServe model that answers MAX's /model/predict (deeplab)")
    parser.add_argument("--seed", type=parse_seed, action="append", default=[], metavar="SEED=PORT[:MODEL]",
                        help=f"serve a Flask seed's POST /model/ on PORT, answered by TorchServe model MODEL (default SEED); SEED: {', '.join(FLASK_SEEDS)}; repeatable")
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_BYTES // 2**20, help="largest request body, in MiB (64, TorchServe's max_request_size here)")
    parser.add_argument("--max-head-kb", type=int, default=ConnectionLimits.max_head_bytes // 2**10, help="largest request head (request line and headers), in KiB (32); over it: 431")
    parser.add_argument("--head-timeout", type=float, default=ConnectionLimits.head_timeout, help="seconds a request head may take to arrive, from its first byte or the connection's opening (10); over it: 408")
    parser.add_argument("--body-timeout", type=float, default=ConnectionLimits.body_timeout, help="seconds a request body may stall without a byte (30); over it: 408")
    parser.add_argument("--keep-alive-timeout", type=float, default=ConnectionLimits.keep_alive_timeout, help="seconds an idle connection is kept open between requests (5)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for TorchServe's reply (600)")
    parser.add_argument("--cors", action="store_true", help="allow cross-origin requests from any origin (also CORS_ENABLE=true, as MAX)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
