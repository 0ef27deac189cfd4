"""The DEXTR seed's folder-poll mode: image + points files in, mask PNG + OPEX JSON out; TorchServe does the work.

  vision-attribution dextr-poll --prediction_in IN --prediction_out OUT [--prediction_tmp TMP]
                                [--prediction_failed FAILED] [--poll_wait 1] [--continuous] [--delete_input]
                                [--threshold 0.5] [--url ... --model dextr --token-file key_file.json]

A pair is NAME.jpg|jpeg|png with NAME.points ({"points": [[x, y] x 4], "label": 1 (optional)}). It gives
NAME.png (8-bit mask, values 0 and the label) and NAME.json (OPEX) in OUT, each written in TMP (or under a
hidden name in OUT) and renamed into place, so readers never see half a file; then the pair moves to OUT (an input
NAME.png as NAME.input.png, beside the mask) or is deleted with --delete_input. A pair that cannot be segmented (unreadable points, a bad image, a refused
request) moves to FAILED (default OUT/failed) with NAME.reason.txt saying why, and the rest go on. A pair whose
files are still being written (points not yet JSON, an image without its end marker, younger than --settle
seconds) is left for the next poll, and so is every pair while TorchServe is unreachable.
"""
import argparse
import base64
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...formats.dextr import opex_document
from .endpoint import EndpointUnavailable, PredictionEndpoint, add_endpoint_arguments, endpoint_from_arguments

log = logging.getLogger("vision_attribution.dextr_poll")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
POINTS_SUFFIX = ".points"
REASON_SUFFIX = ".reason.txt"


class BadPair(Exception):
    """This pair can never be segmented as it is; the message says why."""


class NotReady(Exception):
    """This pair's files look unfinished; try again at the next poll."""


def image_is_complete(path: Path) -> bool:
    """A JPEG ends with its EOI marker, a PNG with its IEND chunk (as far as a file being copied in can tell)."""
    data = path.read_bytes()
    if data[:2] == b"\xff\xd8":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    return True  # another format: TorchServe decides


def moved_name(path: Path) -> str:
    """The name an input gets in the output folder: its own, except that NAME.png becomes NAME.input.png there,
    since NAME.png is the mask."""
    return f"{path.stem}.input{path.suffix}" if path.suffix.lower() == ".png" else path.name


def write_through(data: bytes, destination: Path, tmp_dir: Optional[Path]) -> None:
    """Write `data` to a temporary file (in tmp_dir, or hidden next to the destination) and rename it into place."""
    staging = tmp_dir if tmp_dir is not None else destination.parent
    descriptor, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", dir=staging)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        try:
            os.replace(temporary, destination)
        except OSError:  # tmp_dir on another file system: copy next to the destination, then rename
            hidden = destination.with_name(f".{destination.name}.partial")
            shutil.copyfile(temporary, hidden)
            os.replace(hidden, destination)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@dataclass
class FolderPoller:
    endpoint: PredictionEndpoint
    input_dir: Path
    output_dir: Path
    failed_dir: Path
    tmp_dir: Optional[Path] = None
    threshold: float = 0.5
    delete_input: bool = False
    settle: float = 5.0

    def pairs(self) -> list[tuple[Path, Path]]:
        """(image, points) pairs present in the input folder, by name."""
        found = []
        for image in sorted(self.input_dir.iterdir()):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith("."):
                points = image.with_suffix(POINTS_SUFFIX)
                if points.is_file():
                    found.append((image, points))
        return found

    def poll_once(self) -> dict[str, int]:
        """Segment every pair present now. Returns counts of done, failed (moved aside) and waiting pairs."""
        counts = {"done": 0, "failed": 0, "waiting": 0}
        for image, points in self.pairs():
            try:
                self.segment(image, points)
                counts["done"] += 1
            except NotReady as reason:
                log.info("%s: waiting (%s)", image.name, reason)
                counts["waiting"] += 1
            except EndpointUnavailable as error:
                log.warning("%s: TorchServe is unavailable, will retry (%s)", image.name, error)
                counts["waiting"] += 1
            except BadPair as reason:
                self.move_aside(image, points, str(reason))
                counts["failed"] += 1
            except Exception as error:  # noqa: BLE001 - one pair's surprise must not stop the others
                log.exception("%s: unexpected failure", image.name)
                self.move_aside(image, points, f"unexpected failure: {type(error).__name__}: {error}")
                counts["failed"] += 1
        return counts

    def _settled(self, *paths: Path) -> bool:
        return all(time.time() - path.stat().st_mtime >= self.settle for path in paths)

    def read_prompt(self, image: Path, points: Path) -> dict:
        try:
            prompt = json.loads(points.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            if not self._settled(points):
                raise NotReady(f"{points.name} is not JSON yet") from error
            raise BadPair(f"{points.name} is not JSON: {error}") from error
        if not isinstance(prompt, dict) or "points" not in prompt:
            raise BadPair(f"{points.name} must be a JSON object with \"points\": [[x, y] x 4] (and optionally \"label\"); got {str(prompt)[:200]}")
        unknown = sorted(set(prompt) - {"points", "label"})
        if unknown:
            raise BadPair(f"{points.name} has unknown keys {unknown}; it may hold \"points\" and \"label\"")
        if not image_is_complete(image) and not self._settled(image):
            raise NotReady(f"{image.name} looks unfinished")
        return prompt

    def segment(self, image: Path, points: Path) -> None:
        prompt = self.read_prompt(image, points)
        request = {"image": base64.b64encode(image.read_bytes()).decode("ascii"), "threshold": self.threshold, **prompt}
        reply = self.endpoint.predict(request)
        if reply.status != 200:
            raise BadPair(f"TorchServe refused it with {reply.status}: {reply.error_message()}")
        answer = json.loads(reply.body)
        label = prompt.get("label", 1)
        meta = {"segmenter": "dextr", "points": json.dumps(prompt["points"]), "label": str(label), "threshold": str(self.threshold)}
        opex = opex_document(answer["contours"], label, image.stem, meta)
        write_through(base64.b64decode(answer["mask"]), self.output_dir / f"{image.stem}.png", self.tmp_dir)
        write_through(json.dumps(opex).encode(), self.output_dir / f"{image.stem}.json", self.tmp_dir)
        for path in (image, points):
            if self.delete_input:
                path.unlink()
            else:
                shutil.move(str(path), self.output_dir / moved_name(path))
        log.info("%s: %d contour(s) -> %s", image.name, len(answer["contours"]), self.output_dir / f"{image.stem}.png")

    def move_aside(self, image: Path, points: Path, reason: str) -> None:
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        for path in (image, points):
            shutil.move(str(path), self.failed_dir / path.name)
        write_through(f"{reason}\n".encode(), self.failed_dir / f"{image.stem}{REASON_SUFFIX}", None)
        log.error("%s: moved to %s: %s", image.name, self.failed_dir, reason)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prediction_in", type=Path, required=True, help="the folder the image + points pairs arrive in")
    parser.add_argument("--prediction_out", type=Path, required=True, help="the folder for NAME.png, NAME.json and the processed pairs")
    parser.add_argument("--prediction_tmp", type=Path, help="where the outputs are written before they are renamed into place")
    parser.add_argument("--prediction_failed", type=Path, help="where bad pairs go, with NAME.reason.txt (default: PREDICTION_OUT/failed)")
    parser.add_argument("--poll_wait", type=float, default=1.0, help="seconds between polls (default: %(default)s)")
    parser.add_argument("--continuous", action="store_true", help="keep polling (default: process what is there and exit)")
    parser.add_argument("--delete_input", action="store_true", help="delete the pair instead of moving it to PREDICTION_OUT")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after which an unfinished-looking file counts as bad (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log every poll")
    add_endpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """One pass (exit 1 if pairs were left waiting) or, with --continuous, poll until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for folder in (args.prediction_in, args.prediction_out, args.prediction_tmp):
        if folder is not None and not folder.is_dir():
            log.error("%s is not a folder", folder)
            return 2
    poller = FolderPoller(
        endpoint_from_arguments(args), args.prediction_in, args.prediction_out, args.prediction_failed or args.prediction_out / "failed",
        args.prediction_tmp, args.threshold, args.delete_input, args.settle,
    )  # fmt: skip
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    while True:
        counts = poller.poll_once()
        log.debug("poll: %s", counts)
        if not args.continuous:
            log.info("done: %d segmented, %d moved aside, %d left waiting", counts["done"], counts["failed"], counts["waiting"])
            return 1 if counts["waiting"] else 0
        if stopped.wait(args.poll_wait):
            return 0
