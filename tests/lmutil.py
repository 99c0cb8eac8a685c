"""Helpers shared by the text tests (a uniquely named module: several conftest.py files exist)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_model(path: Path):
    """The transformers reference model for a tiny HF directory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
