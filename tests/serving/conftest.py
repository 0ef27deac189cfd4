"""Serving tests: real TorchServe, Redis, the gateway, Chromium, archive.sh. Every test collected here is marked
`serving` (pyproject.toml registers the marker), so that `pytest -m "not serving"` runs the unit tests only.

`shared_torchserve` is one TorchServe for the whole run (helpers/shared_torchserve.py): modules register the archives
they need in it instead of starting a server of their own."""
from pathlib import Path

import pytest

from shared_torchserve import SharedTorchServe
from torchserve_harness import TorchServe

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.serving)


@pytest.fixture(scope="session")
def shared_torchserve(tmp_path_factory) -> SharedTorchServe:
    """A TorchServe with token auth and the model API on (archives are registered as modules ask for them)."""
    workdir = tmp_path_factory.mktemp("torchserve-shared")
    (workdir / "model_store").mkdir()
    with TorchServe(workdir, workdir / "model_store", [], extra_config={"enable_model_api": "true"}) as server:
        yield SharedTorchServe(server, workdir)
