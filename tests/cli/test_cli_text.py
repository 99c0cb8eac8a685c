"""`aigc text | chat | score | tokenize` on a tiny model: JSON shapes, stdin, streaming, exit codes."""

from __future__ import annotations

import io
import json

import pytest

from aigckit.cli import main


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_json(capsys, tiny_llama_dir):
    rc, out, _ = run(capsys, "text", "w5 w6 w7", "--model", tiny_llama_dir, "--json", "-t", "0",
                     "--max-new-tokens", "6")
    assert rc == 0
    obj = json.loads(out)
    assert set(obj) >= {"model", "text", "token_ids", "finish_reason", "usage", "timings"}
    assert len(obj["token_ids"]) == 6 and obj["finish_reason"] == "length"
    assert obj["usage"] == {"prompt_tokens": 3, "completion_tokens": 6}
    assert set(obj["timings"]) == {"load_s", "prefill_tok_s", "decode_tok_s"}


def test_text_beam_sequences_json(capsys, tiny_llama_dir):
    rc, out, _ = run(capsys, "text", "w5 w6", "--model", tiny_llama_dir, "--json", "--num-beams", "3",
                     "--num-return-sequences", "2", "--max-new-tokens", "4")
    obj = json.loads(out)
    assert rc == 0 and len(obj["sequences"]) == 2
    assert obj["sequences"][0]["score"] >= obj["sequences"][1]["score"]
    assert obj["text"] == obj["sequences"][0]["text"]


def test_text_from_stdin_streams(capsys, monkeypatch, tiny_llama_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6 w7\n"))
    rc, out, _ = run(capsys, "text", "--model", tiny_llama_dir, "-t", "0", "--max-new-tokens", "5")
    assert rc == 0
    want = json.loads(run(capsys, "text", "w5 w6 w7", "--model", tiny_llama_dir, "--json", "-t", "0",
                          "--max-new-tokens", "5")[1])["text"]
    assert out == want + "\n"


def test_score_json(capsys, tiny_llama_dir):
    rc, out, _ = run(capsys, "score", "w5 w6 w7 w8", "--model", tiny_llama_dir, "--json")
    obj = json.loads(out)
    assert rc == 0 and obj["n_tokens"] == 3 and obj["ppl"] > 1


def test_tokenize_json(capsys, tiny_llama_dir):
    rc, out, _ = run(capsys, "tokenize", "w5 w6", "--model", tiny_llama_dir, "--json")
    assert rc == 0 and json.loads(out)["ids"] == [5, 6]


@pytest.mark.parametrize("args, msg", [
    (["--top-p", "2"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--num-beams", "0"], "num_beams must be >= 1"),
])
def test_bad_parameters_exit_2_without_traceback(capsys, tiny_llama_dir, args, msg):
    rc, out, err = run(capsys, "text", "w5", "--model", tiny_llama_dir, *args)
    assert rc == 2 and out == ""
    assert err.strip() == f"aigc: error: {err.strip()[len('aigc: error: '):]}" and msg in err
    assert "Traceback" not in err


def test_refuses_pickle_weights(capsys, tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"\x80\x04")
    rc, _, err = run(capsys, "text", "hi", "--model", f)
    assert rc == 2 and "safetensors" in err


def test_corrupt_safetensors_is_one_line_error(capsys, tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, d)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    rc, _, err = run(capsys, "text", "w5", "--model", d)
    assert rc == 2 and "not a valid safetensors file" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def chatty(tmp_path, tiny_llama_dir):
    """The tiny model with a chat template."""
    import shutil

    d = tmp_path / "chatty"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
                            "{% if add_generation_prompt %}w3 {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_chat_one_shot_from_stdin(capsys, monkeypatch, chatty):
    d = chatty
    monkeypatch.setattr("sys.stdin", io.StringIO("w9 w10"))
    rc, out, _ = run(capsys, "chat", "--model", d, "--json", "-t", "0", "--max-new-tokens", "4",
                     "--system", "w11")
    obj = json.loads(out)
    assert rc == 0 and obj["usage"]["prompt_tokens"] == 8 and len(obj["token_ids"]) == 4


@pytest.mark.parametrize("args, msg", [
    (["--num-beams", "1000"], "num_beams must be <= 32 (the limit), got 1000"),
    (["--num-return-sequences", "100000"], "num_return_sequences must be <= 64 (the limit), got 100000"),
    (["-t", "inf"], "temperature must be <= 100 (a finite number), got inf"),
    (["-t", "inf", "--no-repeat-ngram-size", "1"], "temperature must be <= 100"),
    (["--length-penalty", "nan"], "length_penalty must be a finite number"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
])
def test_unbounded_work_is_refused_before_loading(capsys, tmp_path, args, msg):
    """The limits are checked before the model loads (the model path does not even exist)."""
    rc, out, err = run(capsys, "text", "w5", "--model", tmp_path / "not-loaded", *args)
    assert rc == 2 and out == "" and msg in err and len(err.strip().splitlines()) == 1, err


def test_memory_estimate_is_one_line(capsys, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("AIGC_MAX_MEMORY_GB", "0.0001")
    rc, _, err = run(capsys, "text", "w5", "--model", tiny_llama_dir, "--num-beams", "32", "--max-new-tokens", "100")
    assert rc == 2 and "memory limit" in err and "Traceback" not in err


def test_tiny_temperature_is_greedy_not_a_traceback(capsys, tiny_llama_dir):
    greedy = run(capsys, "text", "w5 w6", "--model", tiny_llama_dir, "-t", "0", "--max-new-tokens", "8", "--json")
    for t in ("1e-45", "1e-40"):
        rc, out, err = run(capsys, "text", "w5 w6", "--model", tiny_llama_dir, "-t", t, "--max-new-tokens", "8",
                           "--json")
        assert rc == 0 and err == "" and json.loads(out)["token_ids"] == json.loads(greedy[1])["token_ids"]


def test_score_reports_windowing(capsys, tiny_llama_dir):
    text = " ".join(f"w{30 + i % 60}" for i in range(300))  # one token per word
    rc, out, _ = run(capsys, "score", text, "--model", tiny_llama_dir, "--json", "--window", "100", "--stride", "50")
    obj = json.loads(out)
    assert rc == 0 and obj["windowing"] == {"window": 100, "stride": 50, "windows": 5} and obj["n_tokens"] == 299
    rc, out, _ = run(capsys, "score", text, "--model", tiny_llama_dir)
    assert rc == 0 and "window(s) of 128 tokens, stride 64" in out
    rc, _, err = run(capsys, "score", text, "--model", tiny_llama_dir, "--window", "500")
    assert rc == 2 and "window must be <= 128" in err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_chat_turns(capsys, monkeypatch, chatty):
    """At a terminal: one reply per non-empty line, /reset clears the history, /exit (or end of input) ends it."""
    d = chatty
    monkeypatch.setattr("sys.stdin", _Tty())
    for lines, replies in ((["w5", "", "/reset", "w6", "/exit", "w7"], 2), (["w5"], 1)):
        feed = iter(lines)

        def fake_input(prompt, feed=feed):
            try:
                return next(feed)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)
        rc = main(["chat", "--model", str(d), "-t", "0", "--max-new-tokens", "3"])
        std = capsys.readouterr()
        assert rc == 0 and std.out.count("assistant> ") == replies, std.out
        assert "/exit to leave" in std.err
