"""Command-line client: prepare seed-style inputs, send them with the TorchServe token, render replies.

  vision-attribution prepare IMAGE [CLASS] OUT.json [--layout hwc-rgb|chw-bgr|hwc-bgr]
  vision-attribution send URL INPUT OUT [--token-file key_file.json] [--field n_steps=20 ...] [--accept TYPE] [--retries 1]
  vision-attribution render REPLY IMAGE OUT.png
  vision-attribution dextr-redis --redis_in IN --redis_out OUT ...     the DEXTR seed's Redis mode
  vision-attribution dextr-poll --prediction_in IN --prediction_out OUT ...   its folder-poll mode
  vision-attribution dextr-train --images DIR --masks DIR --out DIR ...       its training (dextr_train)
  vision-attribution gateway --torchserve URL --key-file key_file.json [--port 5000] [--seed bit=8888 ...]
"""
import argparse
import gzip
import importlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import requests

from ..formats.decode import decode_image_bytes
from .gateway import server as gateway_server
from .worker_loss import WORKER_LOSS_MESSAGES, is_worker_loss  # noqa: F401 - WORKER_LOSS_MESSAGES: the client's name for it

DEXTR_COMMANDS = (
    ("dextr-redis", "vision_attribution.clients.bridges.redis_channel", "the DEXTR seed's Redis mode, in front of TorchServe"),
    ("dextr-poll", "vision_attribution.clients.bridges.folder_poll", "the DEXTR seed's folder-poll mode, in front of TorchServe"),
    ("dextr-train", "vision_attribution.training.dextr", "train or fine-tune DEXTR on images with instance masks"),
)
LAYOUTS = {"hwc-rgb": (False, False), "hwc-bgr": (False, True), "chw-bgr": (True, True)}


def prepare(image_path: Path, target_class, out: Path, layout: str = "hwc-rgb") -> None:
    """Write {"img_data": pixel lists, "target_class": CLASS} as the seeds' prepare_input.py did."""
    pixels = decode_image_bytes(image_path.read_bytes())
    channels_first, bgr = LAYOUTS[layout]
    if bgr:
        pixels = pixels[..., ::-1]
    if channels_first:
        pixels = pixels.transpose(2, 0, 1)
    document = {"img_data": pixels.tolist()}
    if target_class is not None:
        document["target_class"] = target_class
    out.write_text(json.dumps(document))


def read_token(token_file: Path | None, api: str = "inference") -> str | None:
    if token_file is None or not token_file.exists():
        return None
    return json.loads(token_file.read_text())[api]["key"]


def lost_with_its_worker(reply: requests.Response) -> bool:
    """Whether TorchServe itself failed the request because the worker serving it died (killed, out of memory) or
    was scaled down: its own JSON {"code", "type", "message"}, not the handler's {"error"} (worker_loss.py)."""
    return is_worker_loss(reply.status_code, reply.content)


def post(url: str, retries: int = 1, **kwargs) -> requests.Response:
    """requests.post, sent again (at most `retries` times) when TorchServe lost the request with its worker.
    Predictions and explanations have no side effects, so sending one again is safe."""
    reply = requests.post(url, **kwargs)
    for _ in range(retries):
        if not lost_with_its_worker(reply):
            break
        reply = requests.post(url, **kwargs)
    return reply


def send(url: str, input_path: Path, out: Path, token: str | None, fields: dict, accept: str | None, timeout: float, retries: int = 1) -> int:
    """POST a JSON file as JSON, or an image (with form fields, if any); save the reply body. Returns the status."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if accept:
        headers["Accept"] = accept
    body = input_path.read_bytes()
    if input_path.suffix == ".json":
        document = json.loads(body)
        document.update(fields)
        reply = post(url, retries, data=json.dumps(document), headers={**headers, "Content-Type": "application/json"}, timeout=timeout)
    elif fields:
        reply = post(url, retries, files={"image": (input_path.name, body)}, data=fields, headers=headers, timeout=timeout)
    else:
        reply = post(url, retries, data=body, headers=headers, timeout=timeout)
    out.write_bytes(reply.content)
    if reply.status_code != 200:
        print(f"{reply.status_code}: {reply.text}", file=sys.stderr)
    return reply.status_code


def load_reply(path: Path) -> dict:
    """Read a saved reply: gzip(torch.save(dict)), .npz or JSON."""
    import torch  # here, not at the top: the gateway command runs without torch

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        with gzip.open(io.BytesIO(raw)) as stream:
            return torch.load(io.BytesIO(stream.read()))
    if raw[:2] == b"PK":
        arrays = np.load(io.BytesIO(raw))
        reply: dict = {}
        for name in arrays.files:
            *parents, leaf = name.split("/")
            node = reply
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = arrays[name]
        return reply
    return json.loads(raw)


def _field(text: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vision-attribution", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="image -> seed-style JSON request")
    p.add_argument("image", type=Path)
    p.add_argument("rest", nargs="+", help="[CLASS] OUT.json")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="hwc-rgb", help="hwc-rgb: classifiers; chw-bgr: tensormask; hwc-bgr: swin")
    s = commands.add_parser("send", help="POST a request and save the reply")
    s.add_argument("url")
    s.add_argument("input", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--token-file", type=Path, default=Path("key_file.json"))
    s.add_argument("--field", type=_field, action="append", default=[], help="option NAME=VALUE (repeatable)")
    s.add_argument("--accept", help="reply type, e.g. application/x-npz or image/png")
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--retries", type=int, default=1, help="resend a request TorchServe lost with its worker (died, scaled down)")
    r = commands.add_parser("render", help="render a saved reply over the image as PNG")
    r.add_argument("reply", type=Path)
    r.add_argument("image", type=Path)
    r.add_argument("out", type=Path)
    words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
    for name, module_name, summary in DEXTR_COMMANDS:  # a command's module (dextr-train imports torch) only when it runs
        if words[:1] == [name]:
            module = importlib.import_module(module_name)
            command = commands.add_parser(name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(command)
        else:
            commands.add_parser(name, help=summary)
    g = commands.add_parser("gateway", help="serve the seeds' own HTTP APIs (MAX Image Segmenter, the Flask seeds' POST /model/) in front of TorchServe")
    gateway_server.add_arguments(g)
    args = parser.parse_args(argv)

    if args.command == "prepare":
        if len(args.rest) > 2:
            parser.error("prepare takes IMAGE [CLASS] OUT.json")
        target, out = (args.rest[0], Path(args.rest[1])) if len(args.rest) == 2 else (None, Path(args.rest[0]))
        prepare(args.image, target, out, args.layout)
        return 0
    for name, module, _ in DEXTR_COMMANDS:
        if args.command == name:
            return importlib.import_module(module).run(args)
    if args.command == "send":
        status = send(args.url, args.input, args.out, read_token(args.token_file), dict(args.field), args.accept, args.timeout, args.retries)
        return 0 if status == 200 else 1
    if args.command == "gateway":
        return gateway_server.run(args)
    from .render import save_render

    reply = load_reply(args.reply)
    target = reply.get("target", {})
    title = f"target: {target.get('name', '')}" if isinstance(target, dict) else ""
    save_render(reply, decode_image_bytes(args.image.read_bytes()), args.out, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
