"""SFT: masking through the chat template, packing, accumulation, the run folder, resume, bad rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aigckit.cli import main
from aigckit.errors import AigcError
from aigckit.text.lm import load_lm
from aigckit.tune.data import IGNORE, chat_example, pack, read_jsonl, sample_indices
from aigckit.tune.sft import SFTArgs, SFTTask
from aigckit.tune.trainer import cosine_lr, train

from tuneutil import write_jsonl


def test_chat_mask_covers_assistant_turns_only(tiny_chat_dir):
    tok = load_lm(tiny_chat_dir, kernels="torch").tokenizer
    msgs = [{"role": "system", "content": "w11"}, {"role": "user", "content": "w12 w13"},
            {"role": "assistant", "content": "w50 w51"}, {"role": "user", "content": "w14"},
            {"role": "assistant", "content": "w52"}]
    ex = chat_example(tok, msgs, "x:1")
    labelled = [tok.decode([i]) for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    # each assistant turn's text and its end-of-turn marker, nothing from the prompt or the role header
    assert labelled == ["w50", "w51", "w4", "w52", "w4"]
    assert ex.ids == tok.encode_chat(msgs, add_generation_prompt=False)


def test_pack_and_order():
    from aigckit.tune.data import Example

    exs = [Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [IGNORE, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])]
    blocks = pack(exs, 4)
    assert [b.ids for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert blocks[0].labels == [1, 2, 3, IGNORE]
    # every row once per epoch, the same order for the same seed, another for another seed
    a = [sample_indices(10, s, 5, 0) for s in range(4)]
    assert sorted(a[0] + a[1]) == list(range(10)) and sorted(a[2] + a[3]) == list(range(10))
    assert a == [sample_indices(10, s, 5, 0) for s in range(4)] and a != [sample_indices(10, s, 5, 1) for s in range(4)]


def test_cosine_schedule():
    args = SFTArgs(data="x", out="y", steps=10, lr=1.0, warmup=2, min_lr_ratio=0.1)
    lrs = [cosine_lr(s, args) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1


def test_grad_accum_equals_big_batch(tiny_chat_dir, sft_file, tmp_path):
    """Two micro-batches of 2 rows accumulate the gradient of one batch of 4 (loss = mean over all tokens)."""
    grads = []
    for bs, ga in ((4, 1), (2, 2)):
        from aigckit.tune.lora import LoraConfig, add_lora, lora_parameters

        lm = load_lm(tiny_chat_dir, kernels="torch")
        add_lora(lm.model, LoraConfig(r=2), torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in lora_parameters(lm.model):
                p.add_(0.01)  # B != 0 so A gets gradients too
        args = SFTArgs(data=str(sft_file), out=str(tmp_path), batch_size=bs, grad_accum=ga, eval_frac=0.0)
        task = SFTTask()
        task.prepare(lm, args)
        task.step(lm, lm.model, 0, args)
        grads.append(torch.cat([p.grad.flatten() for p in lora_parameters(lm.model)]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def _args(data, out, **kw):
    base = dict(data=str(data), out=str(out), steps=8, lr=5e-3, batch_size=4, lora_rank=4, ckpt_every=3,
                eval_frac=0.25, lora_dropout=0.1, warmup=1)
    return SFTArgs(**{**base, **kw})


def test_run_learns_writes_and_resumes_bit_exact(tiny_chat_dir, sft_file, tmp_path):
    a = train(SFTTask(), _args(sft_file, tmp_path / "a", model=str(tiny_chat_dir)), progress=False)
    assert a["after"]["eval_loss"] < a["before"]["eval_loss"]
    run = tmp_path / "a"
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "curves.png").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    # interrupted after 3 steps (a checkpoint), resumed to 8: the same adapter, bit for bit
    cut = train(SFTTask(), _args(sft_file, tmp_path / "b", model=str(tiny_chat_dir)), progress=False, stop_at=4)
    assert cut["interrupted"] and cut["steps"] == 4
    b = train(SFTTask(), _args(sft_file, tmp_path / "b", model=str(tiny_chat_dir), steps=8), resume=True,
              progress=False)
    wa = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["before"] == a["before"] and b["after"] == a["after"]
    # the trained adapter loads for generation
    lm = load_lm(tiny_chat_dir, adapter=run / "adapter")
    assert lm.chat([{"role": "user", "content": "w11 w12 w13"}], max_new_tokens=3, temperature=0).token_ids
    with pytest.raises(AigcError, match="already holds a run"):
        train(SFTTask(), _args(sft_file, run, model=str(tiny_chat_dir)), progress=False)


def test_packing_runs(tiny_chat_dir, sft_file, tmp_path):
    s = train(SFTTask(), _args(sft_file, tmp_path / "p", model=str(tiny_chat_dir), steps=2, packing=True, max_len=32),
              progress=False)
    assert s["steps"] == 2 and s["tokens_seen"] > 0


def test_bad_rows_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    cases = [("{not json", "not valid JSON"), ('["a"]', "JSON object"), ('{"foo": 1}', '"messages"'),
             ('{"messages": [{"role": "user", "content": "w1"}]}', "no assistant turn"),
             ('{"messages": [{"role": "user"}]}', "string role and content"), ('{"text": ""}', "non-empty")]
    for bad, msg in cases:
        p = tmp_path / "d.jsonl"
        p.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(AigcError, match=f"{p}:3: .*{msg}"):
            read_jsonl(p, "sft")
    with pytest.raises(AigcError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl", "sft")


def test_cli_finetune_and_errors(tiny_chat_dir, sft_file, tmp_path, capsys):
    rc = main(["finetune", "--model", str(tiny_chat_dir), "--data", str(sft_file), "--out", str(tmp_path / "r"),
               "--steps", "2", "--lora-rank", "2", "--target-modules", "q_proj,v_proj", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and "eval_loss" in out["after"]
    conf = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 2 and conf["target_modules"] == ["q_proj", "v_proj"]
    rc = main(["text", "w11 w12", "--model", str(tiny_chat_dir), "--adapter", str(tmp_path / "r" / "adapter"),
               "--max-new-tokens", "2", "-t", "0", "--json"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) >= 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "w1"}, {"prompt": "x"}])
    rc = main(["finetune", "--model", str(tiny_chat_dir), "--data", str(bad), "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:2:" in err and len(err.strip().splitlines()) == 1


def test_head_only_at_labels_equals_full_logits(tiny_llama_dir):
    from aigckit.tune.trainer import sum_nll, token_logps

    lm = load_lm(tiny_llama_dir, kernels="torch")
    ids = torch.tensor([[5, 17, 3, 44, 9, 12], [7, 8, 9, 10, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 3, 44, 9, 12], [IGNORE, 8, 9, 10, IGNORE, IGNORE]])
    with torch.no_grad():
        full = torch.log_softmax(lm.model(ids)[:, :-1], -1)
        got = token_logps(lm.model, ids, labels)
        nll = sum_nll(lm.model, ids, labels)
    mask = labels[:, 1:] != IGNORE
    want = full.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nll, -want.sum(), atol=1e-4, rtol=1e-5)
    assert type(lm.model.lm_head) is torch.nn.Linear  # the head is back


def test_report_of_an_interrupted_run(capsys):
    from types import SimpleNamespace

    from aigckit.cli.tune import _report

    assert _report(SimpleNamespace(json=False), {"before": {}, "steps": 3, "interrupted": True}) == 0
    assert "--resume" in capsys.readouterr().err
