"""A real TorchServe for tests: own TMPDIR, own free ports, started with setsid, stopped by PID."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
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


def build_archive(model: str, out: Path, model_config: dict, checkpoint: Path | None = None, extra_args: tuple = ()) -> Path:
    """Run archive.sh for MODEL into OUT with the given model-config (written next to it)."""
    import yaml

    config_path = out / f"{model}-model-config.yaml"
    config_path.write_text(yaml.safe_dump(model_config))
    command = [str(REPO / "archive.sh"), model, "--out", str(out), "--model-config", str(config_path)]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    done = subprocess.run([*command, *extra_args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"archive.sh failed:\n{done.stdout}\n{done.stderr}")
    return out / f"{model}.mar"


def shipped_model_config(model: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "handlers" / "configs" / f"{model}.yaml").read_text())


class TorchServe:
    """One TorchServe process group serving the archives in `model_store`, with token auth on.
    As a context manager it waits until every worker is READY and stops the server on exit."""

    def __init__(self, workdir: Path, model_store: Path, models: list[str], max_response_size: int = 104857600, extra_config: str = ""):
        self.workdir, self.models = workdir, models
        self.inference_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.inference = f"http://127.0.0.1:{self.inference_port}"
        self.management = f"http://127.0.0.1:{self.management_port}"
        config = (REPO / "config.properties").read_text()
        config = config.replace("127.0.0.1:8080", f"127.0.0.1:{self.inference_port}")
        config = config.replace("127.0.0.1:8081", f"127.0.0.1:{self.management_port}")
        config = config.replace("127.0.0.1:8082", f"127.0.0.1:{self.metrics_port}")
        config = config.replace("model_store=model_store", f"model_store={model_store}")
        config = config.replace("max_response_size=104857600", f"max_response_size={max_response_size}")
        # TorchServe also binds gRPC ports (7070, 7071 by default): give them free ports too, so that test servers
        # (and other TorchServes on this machine) do not stop each other.
        config += f"\ngrpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
        (workdir / "config.properties").write_text(config + extra_config)
        (workdir / "tmp").mkdir(exist_ok=True)
        self.log_path = workdir / "torchserve.log"
        env = dict(os.environ, TMPDIR=str(workdir / "tmp"), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"))
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

    def wait_ready(self, timeout: float = 300) -> None:
        """Ready = every model has all its workers READY (TorchServe's /ping says Healthy too early)."""
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
            if self.keys is not None and all(self.workers_ready(model) for model in self.models):
                return
            time.sleep(1)
        raise TimeoutError(f"TorchServe models not ready after {timeout}s:\n{self.log_tail()}")

    def workers(self, model: str) -> list[dict]:
        reply = requests.get(f"{self.management}/models/{model}", headers=self.auth("management"), timeout=10)
        return reply.json()[0]["workers"] if reply.status_code == 200 else []

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

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
