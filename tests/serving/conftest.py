"""Serving tests: real TorchServe, Redis, the gateway, Chromium, archive.sh (marked `serving` by tests/conftest.py).

`shared_torchserve` is one TorchServe for the whole run (helpers/shared_torchserve.py): modules register the archives
they need in it instead of starting a server of their own."""
import pytest

from shared_torchserve import SharedTorchServe
from torchserve_harness import TorchServe


@pytest.fixture(scope="session")
def shared_torchserve(tmp_path_factory) -> SharedTorchServe:
    """A TorchServe with token auth and the model API on (archives are registered as modules ask for them)."""
    workdir = tmp_path_factory.mktemp("torchserve-shared")
    (workdir / "model_store").mkdir()
    with TorchServe(workdir, workdir / "model_store", [], extra_config={"enable_model_api": "true"}) as server:
        yield SharedTorchServe(server, workdir)
