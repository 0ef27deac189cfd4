"""Is TorchServe ready to serve? Every registered model (or each named one) has at least one worker and all
its workers READY, asked through the management API with the token from key_file.json where token
authorization is on. TorchServe's /ping says Healthy before workers load and while they crash-loop, so
the container's HEALTHCHECK and Kubernetes' readiness probe run this instead:

    python -m vision_attribution.clients.readiness [--config config.properties] [--key-file key_file.json] [MODEL ...]

Exit status 0 when ready, 1 (with the reason on stderr) when not. Standard library only: it starts fast.
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

DEFAULT_MANAGEMENT_ADDRESS = "http://127.0.0.1:8081"


def parse_properties(text: str) -> dict[str, str]:
    """config.properties text as {key: value} (key=value lines; # comments)."""
    properties = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def management_url(properties: dict[str, str]) -> str:
    """The management address, reached locally: a wildcard bind (0.0.0.0) is asked on 127.0.0.1."""
    address = properties.get("management_address", DEFAULT_MANAGEMENT_ADDRESS)
    return address.replace("://0.0.0.0", "://127.0.0.1").rstrip("/")


def management_token(key_file: Path) -> Optional[str]:
    """The management key from TorchServe's key_file.json; None when the file is absent (token auth off)."""
    if not key_file.exists():
        return None
    return json.loads(key_file.read_text())["management"]["key"]


def _get(url: str, token: Optional[str], timeout: float):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def unready_models(base_url: str, token: Optional[str], models: list[str], timeout: float = 5.0) -> list[str]:
    """Reasons why the server is not ready; empty when every model (all registered ones when `models` is
    empty) has at least one worker and every worker is READY."""
    if not models:
        listing = _get(f"{base_url}/models?limit=1000", token, timeout)
        models = [entry["modelName"] for entry in listing.get("models", [])]
        if not models:
            return ["no model is registered"]
    reasons = []
    for model in models:
        try:
            description = _get(f"{base_url}/models/{model}", token, timeout)[0]
        except urllib.error.HTTPError as error:
            reasons.append(f"{model}: management API answered {error.code}")
            continue
        workers = description.get("workers", [])
        states = [worker.get("status") for worker in workers]
        if not workers or any(state != "READY" for state in states):
            reasons.append(f"{model}: workers {states or 'none'}")
    return reasons


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m vision_attribution.clients.readiness")
    parser.add_argument("models", nargs="*", help="models that must be ready (default: every registered model)")
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("TS_CONFIG_FILE", "config.properties")), help="TorchServe's config.properties ($TS_CONFIG_FILE)")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key file, in the directory it was started from")
    args = parser.parse_args(argv)
    properties = parse_properties(args.config.read_text()) if args.config.exists() else {}
    try:
        reasons = unready_models(management_url(properties), management_token(args.key_file), args.models)
    except (OSError, ValueError, KeyError) as error:  # not listening yet, or an unreadable key file
        reasons = [f"management API not reachable: {error}"]
    if reasons:
        print("not ready: " + "; ".join(reasons), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
