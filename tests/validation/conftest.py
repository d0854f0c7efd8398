"""Shared set-up for the validation gate tests: no GX usage statistics, and small image files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before great_expectations is imported by the test modules (GX reads it at import time).
os.environ["GX_ANALYTICS_ENABLED"] = "false"


@pytest.fixture
def good_image(tmp_path: Path) -> Path:
    """A valid 32x32 PNG."""
    from PIL import Image

    path = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path
