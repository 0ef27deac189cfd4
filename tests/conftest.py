"""Tests laid out by what they need: unit/ (no server), serving/ (TorchServe, Redis, the gateway, Chromium,
archive.sh; marked `serving`, see serving/conftest.py) and helpers/ (harnesses and test data writers, importable
from both by their module names)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
