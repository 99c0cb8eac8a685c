"""`aigc doctor`: the machine, its ISA and the kernel each mode selects."""

from __future__ import annotations

import json

from aigckit.cli import main


def test_doctor_json_names_cpu_libraries_and_every_mode(capsys):
    assert main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["kernels"]) == {"fp32", "bf16", "int8", "int4", "w8a8"}
    assert rep["cpu"]["isa"] and rep["torch"]["aten_capability"] and "u8s8_exact" in rep["onednn"]
    assert rep["store"] and "cache_dir" in rep["numba"] or not rep["numba"]["enabled"]


def test_doctor_text(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in ("cpu", "oneDNN", "numba", "w8a8", "store"):
        assert word in out
