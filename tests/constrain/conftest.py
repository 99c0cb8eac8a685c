from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve"))  # serveutil (LiveServer) for the server tests

from constrainutil import make_tiny_bytes


@pytest.fixture(scope="session")
def tiny_bytes_dir(tmp_path_factory) -> Path:
    return make_tiny_bytes(tmp_path_factory.mktemp("constrain") / "tiny-bytes")


@pytest.fixture(scope="session")
def blm(tiny_bytes_dir):
    from aigckit.text.lm import load_lm

    return load_lm(str(tiny_bytes_dir))


@pytest.fixture(scope="session")
def tb_server(tiny_bytes_dir):
    """`aigc serve` on the byte-level tiny model (id "tb"), for the server tests of this folder."""
    from serveutil import API_KEY, LiveServer, free_port

    from aigckit.serve.app import create_app
    from aigckit.serve.models import Registry

    srv = LiveServer(create_app(Registry([f"tb={tiny_bytes_dir}"], max_queue=64), api_key=API_KEY), free_port())
    yield srv.start()
    srv.stop()
