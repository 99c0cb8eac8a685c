"""Shared by the image/data/train/eval tests (a uniquely named module: several conftest.py files exist)."""

from __future__ import annotations

from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed")
