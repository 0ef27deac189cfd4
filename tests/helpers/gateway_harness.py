"""`vision-attribution gateway` as a user starts it, for the serving tests."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from torchserve_harness import free_port

BIN = Path(sys.executable).parent


class Gateway:
    """`vision-attribution gateway` started as a user starts it, in its own process group, stopped by PID."""

    def __init__(self, workdir: Path, torchserve: str, key_file: Path, seeds: dict[str, int], *options: str, models: dict[str, str] | None = None):
        """seeds: Flask seed -> its port; models: Flask seed -> the TorchServe model answering it (default: the seed's
        name)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seeds = seeds
        self.log_path = workdir / f"gateway-{self.port}.log"
        command = [str(BIN / "vision-attribution"), "gateway", "--torchserve", torchserve, "--key-file", str(key_file), "--port", str(self.port)]
        command += [f"--seed={seed}={port}" + (f":{models[seed]}" if models and seed in models else "") for seed, port in seeds.items()] + list(options)
        self.process = subprocess.Popen(command, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_listening([self.port, *seeds.values()])
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, ports: list[int], timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if all(requests.get(f"http://127.0.0.1:{port}/swagger.json", timeout=5).status_code == 200 for port in ports):
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError(f"the gateway did not listen within {timeout}s:\n{self.log_path.read_text()}")

    def seed_url(self, seed: str) -> str:
        return f"http://127.0.0.1:{self.seeds[seed]}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
