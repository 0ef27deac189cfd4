"""The gateway process: MAX Image Segmenter's API on one port, each Flask seed's POST /model/ on a port of its
own (so that a seed's client needs only the host and port changed), all in one uvicorn server.

    vision-attribution gateway --torchserve http://127.0.0.1:8080 --key-file key_file.json [--port 5000]
        [--seed bit=8888 --seed tensormask=8889:MODEL ...] [--host 127.0.0.1] [--max-model deeplab] ...
"""
import argparse
import asyncio
import io
import logging
import os
import socket
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ...formats.seed_apis import FLASK_SEEDS, MAX_INVALID_IMAGE, MAX_METADATA, MAX_MISSING_IMAGE, MAX_PREDICTION_TYPE, max_labels
from . import swagger
from .torchserve import InferenceKey, TorchServeClient

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20  # config.properties' max_request_size


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


def is_an_image(data: bytes) -> bool:
    """MAX's test: PIL can open it (its header; pixels are decoded by the archive, which checks their number)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Image.DecompressionBombError:
        return True  # an image, too large: the archive refuses it with 413 and says so
    except Exception:  # noqa: BLE001 - whatever PIL cannot open is "not a valid image", as MAX said
        return False


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
    middleware = [Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])] if cors else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})


def max_app(torchserve: TorchServeClient, model: str, cors: bool) -> Starlette:
    """MAX Image Segmenter's routes; POST /model/predict is answered by TorchServe's /predictions/{model}."""

    async def metadata(request: Request) -> Response:
        return JSONResponse(MAX_METADATA)

    async def labels(request: Request) -> Response:
        return JSONResponse(max_labels())

    async def predict(request: Request) -> Response:
        body = await request.body()
        async with request.form() as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return JSONResponse(MAX_MISSING_IMAGE, status_code=400)
            if not is_an_image(await upload.read()):
                return JSONResponse(MAX_INVALID_IMAGE, status_code=400)
        # The whole form goes on unchanged: further fields (e.g. image_size) are the archive's options, checked there.
        return await torchserve.post(f"/predictions/{model}", body, _forwarded_headers(request, accept=MAX_PREDICTION_TYPE))

    routes = [Route("/model/metadata", metadata), Route("/model/labels", labels), Route("/model/predict", predict, methods=["POST"])]
    return _app(routes + _documentation_routes(swagger.max_spec()), cors)


def seed_app(torchserve: TorchServeClient, seed: SeedPort, cors: bool) -> Starlette:
    """A Flask seed's POST /model/: its JSON body goes to TorchServe unchanged, the seed reply comes back unchanged."""
    path = f"/{FLASK_SEEDS[seed.seed][1]}/{seed.model}"

    async def model(request: Request) -> Response:
        return await torchserve.post(path, await request.body(), _forwarded_headers(request))

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
    """One ASGI app for several listening sockets: each request goes to the app of the port it came in on."""

    def __init__(self, apps_by_port: dict[int, object]):
        self.apps_by_port = apps_by_port

    async def __call__(self, scope, receive, send):
        await self.apps_by_port[scope["server"][1]](scope, receive, send)


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
    import uvicorn

    sockets, apps = [], {}
    for label, port, app in served:
        sockets.append(listening_socket(args.host, port))
        apps[sockets[-1].getsockname()[1]] = UploadLimit(app, args.max_upload_mb * 2**20)
        log.info("%s on http://%s:%d", label, args.host, sockets[-1].getsockname()[1])
    config = uvicorn.Config(PortDispatch(apps), lifespan="off", log_level=args.log_level)
    try:
        await uvicorn.Server(config).serve(sockets=sockets)
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
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for TorchServe's reply (600)")
    parser.add_argument("--cors", action="store_true", help="allow cross-origin requests from any origin (also CORS_ENABLE=true, as MAX)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
