"""Test-wide settings: no network, Triton in interpreter mode (no GPU in CI), a private cache."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Worlds and scorers built by a test go to a temporary folder, never the user's cache."""
    monkeypatch.setenv("BETTER_CAPTIONS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
