"""`aigc text --watermark KEY` then `aigc detect --key KEY --json`; errors are one line and exit 2."""

from __future__ import annotations

import json

from aigckit.cli import main
from aigckit.trust.watermark import Watermark


def test_text_watermark_then_detect(tiny_llama_dir, tmp_path, capsys):
    args = ["--model", str(tiny_llama_dir), "--max-new-tokens", "30", "--temperature", "0.9", "--seed", "3", "--json"]
    assert main(["text", "w5 w6 w7", "--watermark", "cli-key", "--watermark-delta", "30", *args]) == 0
    res = json.loads(capsys.readouterr().out)
    ids = [7] + res["token_ids"]
    text = " ".join(f"w{i}" for i in ids)
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert main(["detect", str(f), "--key", "cli-key", "--model", str(tiny_llama_dir), "--json",
                 "--keep-repeats"]) == 0
    d = json.loads(capsys.readouterr().out)["watermark"]
    # (the tiny tokenizer reads "w2x" as its special EOS "w2" + unknown: a few tokens do not round-trip)
    assert d["watermarked"] and d["green"] >= d["n_scored"] - 8 and 0 <= d["p_value"] < 1e-6
    # the model's entropies decide which steps count (the default)
    assert d["params"]["entropy_gate"] == Watermark.min_entropy
    assert main(["detect", str(f), "--key", "cli-key", "--model", str(tiny_llama_dir), "--json", "--keep-repeats",
                 "--no-model"]) == 0
    d0 = json.loads(capsys.readouterr().out)["watermark"]
    assert d0["params"]["entropy_gate"] is None and d0["n_scored"] >= d["n_scored"]
    # a gate above every step of this tiny model's (near-uniform) distributions: nothing is scored, no verdict
    assert main(["detect", str(f), "--key", "cli-key", "--model", str(tiny_llama_dir), "--json",
                 "--min-entropy", "19"]) == 0
    d19 = json.loads(capsys.readouterr().out)["watermark"]
    assert d19["n_scored"] == 0 and not d19["watermarked"]
    key_file = tmp_path / "key"
    key_file.write_text("wrong-key\n")
    assert main(["detect", text, "--key", f"@{key_file}", "--model", str(tiny_llama_dir)]) == 0
    assert "no watermark found" in capsys.readouterr().out


def test_detect_errors(tiny_llama_dir, capsys):
    assert main(["detect", "w5 w6", "--model", str(tiny_llama_dir)]) == 2
    assert "--key" in capsys.readouterr().err
    assert main(["detect", "w5 w6", "--key", "k", "--fpr", "3", "--model", str(tiny_llama_dir)]) == 2
    assert main(["text", "w5", "--watermark", "k", "--watermark-gamma", "1.5", "--model", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "gamma" in err[-1]
