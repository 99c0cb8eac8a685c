"""aigc batch: rows through the continuous-batching scheduler, results appended as they finish, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigckit.batch.rows import done_ids, read_rows
from aigckit.batch.runner import BatchArgs, run_batch
from aigckit.errors import AigcError
from aigckit.text.params import GenerationParams

SRC = Path(__file__).parents[2] / "src"


def _prompts(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(3 + i % 5))}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _results(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        assert r["id"] not in out, f"{r['id']} written twice"
        out[r["id"]] = r
    return out


@pytest.mark.slow
def test_killed_job_resumes_without_redoing_finished_rows(tmp_path, tiny_llama_dir):
    n = 16
    inp = _write_jsonl(tmp_path / "in.jsonl", _prompts(n))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "aigckit", "batch", "--input", str(inp), "--output", str(out), "--model",
           str(tiny_llama_dir), "--temperature", "0.8", "--seed", "5", "--max-new-tokens", "12", "--max-batch", "2",
           "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with open(out, "a") as f:  # as if killed in the middle of writing a line
        f.write('{"id": "q1')
    before = {r for r in _results_prefix(out)}
    assert 3 <= len(before) < n
    args = BatchArgs(input=str(inp), output=str(out), model=str(tiny_llama_dir), threads=1, max_batch=4,
                     params=GenerationParams(temperature=0.8, seed=5, max_new_tokens=12))
    s = run_batch(args, progress=False)
    assert (s["done_before"], s["written"], s["errors"]) == (len(before), n - len(before), 0)
    res = _results(out)
    assert sorted(res) == sorted(f"q{i}" for i in range(n))
    for r in res.values():
        u = r["usage"]
        assert r["finish_reason"] in ("stop", "length") and u["total_tokens"] == u["prompt_tokens"] + \
            u["completion_tokens"] and 0 < u["completion_tokens"] <= 12
    # nothing left: a third run writes nothing; with --overwrite the same rows again, the same texts (seed S+N per
    # row: independent of the batch a row ran in, of max_batch and of the kill)
    assert run_batch(args, progress=False)["written"] == 0
    again = run_batch(BatchArgs(**{**args.__dict__, "overwrite": True, "max_batch": 3}), progress=False)
    assert again["done_before"] == 0 and again["written"] == n
    res2 = _results(out)
    same = sum(res2[k]["text"] == res[k]["text"] for k in res)
    assert same >= n - 1, f"only {same} of {n} rows reproduced"  # float sums differ by batch: a rare tie may flip


def _results_prefix(out: Path) -> set[str]:
    """Ids of the complete lines (the partial last line cut, as a resume does)."""
    return done_ids(out)


def test_parquet_input_per_row_options_and_row_errors(tmp_path, tiny_llama_dir):
    pa = pytest.importorskip("pyarrow", reason="Parquet input needs pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": "a", "prompt": "w5 w6 w7", "max_new_tokens": 3},
            {"id": "b", "prompt": "w9 w10", "max_new_tokens": None},
            {"id": "c", "prompt": "w3 " * 20, "max_new_tokens": None}]  # longer than max_length: an error row
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "o.jsonl"
    s = run_batch(BatchArgs(input=f"file://{tmp_path}/in.parquet", output=str(out), model=str(tiny_llama_dir),
                            threads=1, params=GenerationParams(temperature=0, max_new_tokens=5, max_length=12)),
                  progress=False)
    assert (s["written"], s["errors"]) == (3, 1)
    res = _results(out)
    assert res["a"]["usage"]["completion_tokens"] <= 3 and res["b"]["usage"]["completion_tokens"] <= 5
    assert res["c"]["error"]["param"] == "max_length" and "text" not in res["c"]


def test_input_errors(tmp_path):
    _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "x"}, {"id": 1, "prompt": "y"}])
    with pytest.raises(AigcError, match="appears twice"):
        read_rows(str(tmp_path / "dup.jsonl"))
    _write_jsonl(tmp_path / "both.jsonl", [{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}])
    with pytest.raises(AigcError, match="exactly one of prompt or messages"):
        read_rows(str(tmp_path / "both.jsonl"))
    assert [r.id for r in read_rows(str(_write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "x"}, {"custom_id": "z",
                                                                                        "prompt": "y"}])))] == \
        ["row-0", "z"]
    with pytest.raises(AigcError, match="needs --ray"):
        BatchArgs(input="x.jsonl", output="o.jsonl", workers=2)
    _write_jsonl(tmp_path / "other.jsonl", [{"id": "zz", "text": "from another job"}])
    with pytest.raises(AigcError, match="ids not in"):
        run_batch(BatchArgs(input=str(tmp_path / "ok.jsonl"), output=str(tmp_path / "other.jsonl")), progress=False)


def test_cli_batch_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "aigckit", "batch", "--input", str(tmp_path / "nope.jsonl"),
                        "--output", str(tmp_path / "o.jsonl")], env={**os.environ, "PYTHONPATH": str(SRC)},
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "input not found" in r.stderr


def test_cli_ignore_eos_makes_exactly_max_new_tokens(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """bench/batch_speed.py relies on it: every row generates --max-new-tokens tokens, EOS or not."""
    from aigckit.batch import runner
    from aigckit.cli import main

    seen = []
    real = runner.run_batch
    monkeypatch.setattr(runner, "run_batch", lambda args, **kw: (seen.append(args.params), real(args, **kw))[1])
    inp = _write_jsonl(tmp_path / "in.jsonl", _prompts(4))
    for flag, out in (([], "a.jsonl"), (["--ignore-eos"], "b.jsonl")):
        assert main(["batch", "--input", str(inp), "--output", str(tmp_path / out), "--model", str(tiny_llama_dir),
                     "-t", "0", "--max-new-tokens", "40", "--quiet", "--json", *flag]) == 0
    assert [p.ignore_eos for p in seen] == [False, True] and seen[1].max_new_tokens == 40
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion_tokens"] == 4 * 40
    b = _results(tmp_path / "b.jsonl")
    assert all(r["usage"]["completion_tokens"] == 40 and r["finish_reason"] == "length" for r in b.values())
