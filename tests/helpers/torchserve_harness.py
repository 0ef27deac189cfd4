"""A real TorchServe for tests: own TMPDIR, own free ports, started with setsid, stopped by PID."""
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ARCHIVE_CONFIGS = REPO / "vision_attribution" / "archives" / "configs"
"""Each archive's shipped model-config, ARCHIVE.yaml (what archive.sh uses without --model-config)."""
TORCHSERVE = Path(sys.executable).parent / "torchserve"


def jpeg_bytes(array: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes, optionally resized to size=(width, height)."""
    image = Image.fromarray(array)
    if size:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_archive(model: str, out: Path, model_config: dict, checkpoint: Path | None = None, extra_args: tuple = (), name: str | None = None,
                  config_dir: Path | None = None) -> Path:
    """Run archive.sh for MODEL into OUT with the given model-config (written to CONFIG_DIR, default OUT), as
    model NAME (archive.sh --name; default MODEL); returns OUT/NAME.mar."""
    import yaml

    name = name or model
    config_path = (config_dir or out) / f"{name}-model-config.yaml"
    config_path.write_text(yaml.safe_dump(model_config))
    command = [str(REPO / "archive.sh"), model, "--out", str(out), "--model-config", str(config_path)]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    if name != model:
        command += ["--name", name]
    done = subprocess.run([*command, *extra_args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"archive.sh failed:\n{done.stdout}\n{done.stderr}")
    return out / f"{name}.mar"


def build_in_parallel(builders: dict[str, Callable[[], Path]], workers: int = 2) -> dict[str, Path]:
    """Run archive builders `workers` at a time (a build is mostly one core: archive.sh's Python, then
    torch-model-archiver); returns name -> the .mar each wrote. The first failure is raised once all are done."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(builder) for name, builder in builders.items()}
    return {name: future.result() for name, future in futures.items()}


def shipped_model_config(model: str) -> dict:
    import yaml

    return yaml.safe_load((ARCHIVE_CONFIGS / f"{model}.yaml").read_text())


def _kernel_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order) -> its usual text form."""
    raw = b"".join(int(hex_address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_address), 8))
    return str(ipaddress.ip_address(raw))


class TorchServe:
    """One TorchServe process group serving the archives in `model_store`, with token auth on.
    As a context manager it waits until every worker is READY and stops the server on exit."""

    def __init__(self, workdir: Path, model_store: Path, models: list[str], max_response_size: int = 104857600, extra_config: dict | None = None):
        """extra_config: further config.properties keys, e.g. {"enable_model_api": "true"} to allow registration."""
        self.workdir, self.models = workdir, models
        self.inference_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.grpc_ports = (free_port(), free_port())  # TorchServe always opens its gRPC inference and management APIs
        self.inference = f"http://127.0.0.1:{self.inference_port}"
        self.management = f"http://127.0.0.1:{self.management_port}"
        config = (REPO / "config.properties").read_text()
        config = config.replace("127.0.0.1:8080", f"127.0.0.1:{self.inference_port}")
        config = config.replace("127.0.0.1:8081", f"127.0.0.1:{self.management_port}")
        config = config.replace("127.0.0.1:8082", f"127.0.0.1:{self.metrics_port}")
        config = config.replace("grpc_inference_port=7070", f"grpc_inference_port={self.grpc_ports[0]}")
        config = config.replace("grpc_management_port=7071", f"grpc_management_port={self.grpc_ports[1]}")
        config = config.replace("model_store=model_store", f"model_store={model_store}")
        config = config.replace("max_response_size=104857600", f"max_response_size={max_response_size}")
        config += "".join(f"{key}={value}\n" for key, value in (extra_config or {}).items())
        (workdir / "config.properties").write_text(config)
        (workdir / "tmp").mkdir(exist_ok=True)
        self.log_path = workdir / "torchserve.log"
        # TEMP becomes the frontend's java.io.tmpdir, where it puts the workers' Unix sockets (.ts.sock.9000, ...):
        # under /tmp, servers started side by side would take over each other's worker sockets.
        env = dict(os.environ, TMPDIR=str(workdir / "tmp"), TEMP=str(workdir / "tmp"), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        self.process = subprocess.Popen(
            [str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", str(workdir / "config.properties"),
             "--model-store", str(model_store), *(["--models", *[f"{m}={m}.mar" for m in models]] if models else [])],
            cwd=workdir, env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.keys = None

    def __enter__(self) -> "TorchServe":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 300, models: list[str] | None = None) -> None:
        """Ready = every model (of `models`, default all) has all its workers READY (TorchServe's /ping says Healthy
        too early)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.process.returncode}:\n{self.log_tail()}")
            key_file = self.workdir / "key_file.json"
            if self.keys is None and key_file.exists():
                try:
                    self.keys = json.loads(key_file.read_text())
                except json.JSONDecodeError:
                    pass
            if self.keys is not None and all(self.workers_ready(model) for model in (self.models if models is None else models)):
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe models not ready after {timeout}s:\n{self.log_tail()}")

    def register(self, names: list[str], timeout: float = 600) -> None:
        """Register the model store's NAME.mar archives as models NAME through the management API (the server needs
        enable_model_api=true), each with the workers and batching its model-config asks for; returns when all
        their workers are READY."""
        for name in names:
            reply = self.manage("POST", "/models", params={"url": f"{name}.mar", "model_name": name}, timeout=60)
            if reply.status_code != 200:
                raise RuntimeError(f"registering {name} failed: {reply.status_code} {reply.text}\n{self.log_tail()}")
            self.models = [*self.models, name]
        self.wait_ready(timeout, names)

    def unregister(self, name: str) -> None:
        """Stop the model's workers and forget it (DELETE /models/NAME)."""
        reply = self.manage("DELETE", f"/models/{name}", timeout=120)
        if reply.status_code != 200:
            raise RuntimeError(f"unregistering {name} failed: {reply.status_code} {reply.text}")
        self.models = [model for model in self.models if model != name]

    def model_description(self, model: str) -> dict:
        """The management API's description of `model` (batchSize, workers, ...); {} while it is unknown."""
        reply = requests.get(f"{self.management}/models/{model}", headers=self.auth("management"), timeout=10)
        return reply.json()[0] if reply.status_code == 200 else {}

    def workers(self, model: str) -> list[dict]:
        return self.model_description(model).get("workers", [])

    def worker_pids(self, model: str) -> list[int]:
        """Process ids of the model's workers, as the management API reports them (`workers[].pid`)."""
        return [worker["pid"] for worker in self.workers(model)]

    def workers_ready(self, model: str) -> bool:
        try:
            workers = self.workers(model)
        except requests.RequestException:
            return False
        return bool(workers) and all(worker["status"] == "READY" for worker in workers)

    def auth(self, api: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.keys[api]['key']}"}

    def post(self, path: str, timeout: float = 300, headers: dict | None = None, **kwargs) -> requests.Response:
        return requests.post(f"{self.inference}{path}", headers={**self.auth(), **(headers or {})}, timeout=timeout, **kwargs)

    def manage(self, method: str, path: str, timeout: float = 300, headers: dict | None = None, **kwargs) -> requests.Response:
        """A management API call with the management token (headers may replace it)."""
        return requests.request(method, f"{self.management}{path}", headers={**self.auth("management"), **(headers or {})}, timeout=timeout, **kwargs)

    def scale(self, model: str, workers: int, attempts: int = 3) -> requests.Response:
        """Scale `model` to `workers` workers synchronously (PUT /models/NAME?min_worker=N&max_worker=N), as an operator
        does: TorchServe's frontend may answer a scale call made while requests are in flight with 500
        ConcurrentModificationException (a race in its Java worker bookkeeping), and the call is repeated then."""
        for _ in range(attempts):
            reply = self.manage("PUT", f"/models/{model}?min_worker={workers}&max_worker={workers}&synchronous=true")
            if not (reply.status_code == 500 and "ConcurrentModificationException" in reply.text):
                return reply
        return reply

    def process_ids(self) -> list[int]:
        """Every live process of the server's process group: the launcher, the Java frontend and the workers."""
        group = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                state, _, group_id = stat.rpartition(")")[2].split()[:3]  # fields 3 (state), 4, 5 (pgrp)
                if int(group_id) == self.process.pid and state != "Z":
                    group.append(int(entry.name))
        return group

    def tcp_listeners(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket in LISTEN state held by a process of the server, read from the
        kernel's tables (/proc/net/tcp, tcp6) through the processes' open socket inodes."""
        inodes = set()
        for pid in self.process_ids():
            try:
                for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:
                continue
        listeners = []
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                    address, port = local.split(":")
                    listeners.append((_kernel_address(address), int(port, 16)))
        return listeners

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the whole process group, then wait until every process of it is gone (the launcher exits
        before the Java frontend has closed its listeners); SIGKILL what is left after `timeout` seconds."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None or self.process_ids():
            if time.monotonic() > deadline:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
                break
            time.sleep(0.2)

    def _signal_group(self, signal_number: int) -> None:
        try:
            os.killpg(self.process.pid, signal_number)
        except ProcessLookupError:  # every process of the group has exited
            pass
