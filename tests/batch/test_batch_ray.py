"""aigc batch --ray: Ray Data map_batches with an actor per worker (a local Ray of 2 CPUs, 2 workers x 1 thread)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigckit.batch.runner import BatchArgs, run_batch
from aigckit.text.params import GenerationParams

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'aigckit[ray]'")


@pytest.mark.slow
def test_ray_two_workers_write_every_row_once_and_match_one_process(tmp_path, tiny_llama_dir):
    rows = [{"id": f"r{i}", "prompt": f"w{i + 3} w{i + 4} w{2 * i + 5}"} for i in range(12)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = GenerationParams(temperature=0.8, seed=11, max_new_tokens=8)
    kw = dict(input=str(inp), model=str(tiny_llama_dir), threads=1, max_batch=4, params=params)
    run_batch(BatchArgs(output=str(tmp_path / "local.jsonl"), **kw), progress=False)
    # 5 rows done before: Ray gets the other 7 only
    local_lines = (tmp_path / "local.jsonl").read_text().splitlines()
    (tmp_path / "ray.jsonl").write_text("".join(line + "\n" for line in local_lines[:5]))
    s = run_batch(BatchArgs(output=str(tmp_path / "ray.jsonl"), ray=True, workers=2, **kw), progress=False)
    assert (s["backend"], s["done_before"], s["written"], s["errors"]) == ("ray", 5, 7, 0)
    local = {json.loads(x)["id"]: json.loads(x) for x in local_lines}
    got = [json.loads(x) for x in Path(tmp_path / "ray.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in got) == sorted(local)  # every row once
    same = sum(r["text"] == local[r["id"]]["text"] and r["usage"] == local[r["id"]]["usage"] for r in got)
    assert same >= len(rows) - 1  # row N samples with seed S+N on any worker (a float tie may flip one)
