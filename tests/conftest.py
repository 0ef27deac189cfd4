"""Tests laid out by what they need: unit/ (no server), serving/ (TorchServe, Redis, the gateway, Chromium,
archive.sh) and helpers/ (harnesses and test data writers, importable from both by their module names).

Split by cost: every test under serving/ and every unit test marked `slow` (over about 3 s on 2 cores) carries the
marker `serving`, so that `pytest -m "not serving"` is the quick loop (about a minute) and plain `pytest` runs all."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
SERVING = Path(__file__).resolve().parent / "serving"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if SERVING in Path(item.path).resolve().parents or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.serving)
