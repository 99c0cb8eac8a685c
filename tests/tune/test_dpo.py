"""DPO: loss parity with TRL's DPOTrainer on the same model, adapter and batch; the formula; a short run."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from aigckit.errors import AigcError
from aigckit.text.lm import load_lm
from aigckit.tune.data import IGNORE
from aigckit.tune.dpo import DPOArgs, DPOTask, dpo_loss
from aigckit.tune.lora import adapters_disabled, attach_adapter
from aigckit.tune.trainer import token_logps, train
from tuneutil import words, write_jsonl


def _pairs(n, seed=0, chat=False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = [rng.randint(10, 40) for _ in range(4)]
        good = " ".join(f"w{x + 40}" for x in q[:3])
        bad = words(rng, 5, 10, 30)  # a different vocabulary: a preference that generalises
        if chat:
            rows.append({"prompt": [{"role": "user", "content": " ".join(f"w{x}" for x in q)}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"prompt": " ".join(f"w{x}" for x in q), "chosen": good, "rejected": bad})
    return rows


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_equals_trl(tiny_llama_dir, tmp_path, loss_type):
    """TRL's DPOTrainer (peft adapter, reference = adapter disabled) and ours on TRL's own batch: same loss."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = [{**r, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in _pairs(3)]  # TRL joins text
    cfg = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss_type], report_to="none",
                        per_device_train_batch_size=3, use_cpu=True, max_length=None)
    trainer = trl.DPOTrainer(model=hf, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj", "up_proj"]))
    trainer.model.eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained-looking adapter (a fresh one has B = 0: policy == reference)
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    trainer.model.save_pretrained(tmp_path / "ad")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)

    lm = load_lm(tiny_llama_dir, kernels="torch")
    attach_adapter(lm.model, tmp_path / "ad")
    ids, mask = batch["input_ids"], batch["completion_mask"]
    assert bool((batch["attention_mask"].cumprod(-1) == batch["attention_mask"]).all())  # right padding only
    labels = ids.masked_fill(mask == 0, IGNORE)
    avg = loss_type == "ipo"

    def logps():
        lp = token_logps(lm.model, ids, labels).sum(-1)
        if avg:
            lp = lp / (labels[:, 1:] != IGNORE).sum(-1)
        return lp.chunk(2)

    with torch.no_grad():
        pw, pl = logps()
        with adapters_disabled(lm.model):
            rw, rl = logps()
    ours = dpo_loss(pw, pl, rw, rl, 0.3, loss_type)[0].mean()
    assert abs(float(theirs)) > 1e-4
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-4)


def test_formula():
    pw, pl, rw, rl = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5]), torch.tensor([-3.0])
    losses, cw, cr = dpo_loss(pw, pl, rw, rl, beta=0.5)
    h = (pw - rw) - (pl - rl)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-0.5 * h)))  # -log sigmoid(beta h)
    torch.testing.assert_close(cw - cr, 0.5 * h)
    smooth = dpo_loss(pw, pl, rw, rl, beta=0.5, label_smoothing=0.2)[0]
    torch.testing.assert_close(smooth, 0.8 * torch.log1p(torch.exp(-0.5 * h)) + 0.2 * torch.log1p(torch.exp(0.5 * h)))
    assert F.relu(1 - 0.5 * h).equal(dpo_loss(pw, pl, rw, rl, beta=0.5, loss_type="hinge")[0])


@pytest.mark.parametrize("chat", [False, True])
def test_run_raises_preference_accuracy(tiny_chat_dir, tmp_path, chat):
    data = write_jsonl(tmp_path / "p.jsonl", _pairs(24, chat=chat))
    held = write_jsonl(tmp_path / "h.jsonl", _pairs(8, seed=1, chat=chat))
    args = DPOArgs(data=str(data), eval_data=str(held), out=str(tmp_path / "r"), model=str(tiny_chat_dir), steps=24,
                   lr=2e-2, batch_size=4, lora_rank=4, beta=0.5)
    s = train(DPOTask(), args, progress=False)
    assert s["before"]["eval_reward_accuracy"] == 0.0  # policy == reference: every implicit reward is 0
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    assert s["after"]["eval_reward_accuracy"] >= 0.75
    assert s["after"]["eval_preference_accuracy"] >= s["before"]["eval_preference_accuracy"]


def test_bad_pairs(tmp_path):
    from aigckit.tune.data import read_jsonl

    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"},
                                           {"prompt": "w1", "chosen": "w2"}])
    with pytest.raises(AigcError, match=f"{p}:2: rejected"):
        read_jsonl(p, "dpo")
    with pytest.raises(AigcError, match="beta"):
        DPOArgs(data="x", out="y", beta=0).check()


def test_cli_dpo(tiny_chat_dir, tmp_path, capsys):
    import json

    from aigckit.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", _pairs(6, chat=True))
    rc = main(["dpo", "--model", str(tiny_chat_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1",
               "--beta", "0.2", "--loss-type", "ipo", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 1 and "eval_reward_accuracy" in out["after"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["args"]["loss_type"] == "ipo"
