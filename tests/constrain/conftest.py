from __future__ import annotations

from pathlib import Path

import pytest

from constrainutil import make_tiny_bytes


@pytest.fixture(scope="session")
def tiny_bytes_dir(tmp_path_factory) -> Path:
    return make_tiny_bytes(tmp_path_factory.mktemp("constrain") / "tiny-bytes")


@pytest.fixture(scope="session")
def blm(tiny_bytes_dir):
    from aigckit.text.lm import load_lm

    return load_lm(str(tiny_bytes_dir))
