"""GRPO/RLOO: the advantage and loss formulas, rewards (built-ins, module:function, None), a short run that raises
the held-out reward, and bit-exact resume (sampling is seeded per step)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from aigckit.cli import main
from aigckit.errors import AigcError
from aigckit.tune.grpo import RLArgs, RLTask, advantages, policy_loss
from aigckit.tune.rewards import parse_reward, score
from aigckit.tune.trainer import train
from tuneutil import words, write_jsonl


def test_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    g = advantages(r, "grpo")
    torch.testing.assert_close(g[0], (r[0] - 0.5) / (r[0].std() + 1e-4))
    assert g[1].abs().max() == 0  # a zero-std group gives no signal
    loo = advantages(r, "rloo")
    for i in range(4):  # r_i minus the mean of the others
        others = torch.cat([r[0, :i], r[0, i + 1:]]).mean()
        torch.testing.assert_close(loo[0, i], r[0, i] - others)


def test_policy_loss_gradient_and_kl():
    pol = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv, mask = torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 0.0]])
    terms, kl = policy_loss(pol, pol.detach(), None, adv, mask, beta=0.0, epsilon=0.2)
    terms.sum().backward()
    # at ratio 1 the clipped surrogate's gradient is -A on each log-prob (REINFORCE with the advantage)
    torch.testing.assert_close(pol.grad, torch.tensor([[-2.0, -2.0, 0.0]]))
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    _, kl = policy_loss(pol.detach(), pol.detach(), ref, adv, mask, beta=0.1, epsilon=0.2)
    assert kl[0, 0] == 0 and kl[0, 1] > 0 and kl[0, 2] == 0  # k3 >= 0, zero where pi == ref and off the mask
    d = torch.tensor(1.0)  # ref - pol at token 1
    torch.testing.assert_close(kl[0, 1], torch.exp(d) - d - 1)


def test_builtin_rewards(tmp_path):
    comps = ["42", "the answer is 41", '```json\n{"a": 1}\n```', "{bad"]
    assert parse_reward(r"format:\d+").fn([""] * 4, comps) == [1.0, 0.0, 0.0, 0.0]
    assert parse_reward("exact-number").fn([""] * 4, comps, answer=[42, 41, 1, 0]) == [1.0, 1.0, 1.0, 0.0]
    assert parse_reward("exact").fn([""] * 4, comps, answer=["42", "41", "", ""]) == [1.0, 0.0, 0.0, 0.0]
    assert parse_reward("json").fn([""] * 4, comps) == [1.0, 0.0, 1.0, 0.0]  # "42" is JSON, "{bad" is not
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["b"]}))
    assert parse_reward(f"json:{schema}").fn([""], ['{"a": 1}']) == [0.0]
    ln = parse_reward("length:4=0.5")
    assert ln.weight == 0.5 and ln.fn([""] * 2, ["", ""], completion_ids=[[1, 2, 3, 4], [1, 2]]) == [1.0, 0.5]
    br = parse_reward("brevity:2")
    assert br.fn([""] * 3, [""] * 3, completion_ids=[[1], [1, 2], [1, 2, 3, 4, 5, 6, 7, 8]]) == [1.0, 1.0, 0.25]
    with pytest.raises(AigcError, match="brevity"):
        parse_reward("brevity:0")
    chat = [[{"role": "assistant", "content": "7"}]]
    assert parse_reward("exact-number").fn([""], chat, answer=["7"]) == [1.0]
    with pytest.raises(AigcError, match="unknown reward"):
        parse_reward("nope")
    with pytest.raises(AigcError, match="cannot import"):
        parse_reward("no_such_module_x:fn")
    with pytest.raises(AigcError, match="answer"):
        parse_reward("exact").fn([""], ["x"])


def test_weighted_sum_skips_none():
    rs = [parse_reward("tuneutil:low_ids_reward=2"), parse_reward("tuneutil:none_reward")]
    per, total = score(rs, ["p", "p"], ["w1 w50", "w60"], {}, [[1, 50], [60]])
    assert total == [1.0, 0.0] and all(v != v for v in per[1])  # NaN where None


def _prompts(path, n, seed):
    rng = random.Random(seed)
    return write_jsonl(path, [{"prompt": words(rng, 4), "answer": "w1"} for _ in range(n)])


def _args(tmp_path, out, model, **kw):
    base = dict(data=str(_prompts(tmp_path / "train.jsonl", 16, 0)), eval_data=str(_prompts(tmp_path / "h.jsonl", 8, 1)),
                out=str(out), model=str(model), steps=6, lr=3e-2, batch_size=2, num_generations=4, max_new_tokens=6,
                lora_rank=4, rewards=["tuneutil:low_ids_reward"], ckpt_every=2, beta=0.04, max_len=64)
    return RLArgs(**{**base, **kw})


def test_grpo_raises_held_out_reward_and_resumes_bit_exact(tiny_llama_dir, tmp_path):
    s = train(RLTask(), _args(tmp_path, tmp_path / "a", tiny_llama_dir), progress=False)
    assert s["after"]["eval_reward"] > s["before"]["eval_reward"] + 0.2
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward" in r]
    assert len(train_rows) == 6 and all(0 <= r["gen_share"] <= 1 and r["kl"] >= 0 for r in train_rows)
    assert "reward/low_ids_reward" in train_rows[0] and "zero_std_frac" in train_rows[0]
    assert len(s["samples_before"]) == 4 and len(s["samples_after"]) == 4
    assert json.loads((tmp_path / "a" / "config.json").read_text())["kind"] == "grpo"
    # interrupted after 2 steps and resumed: the same adapter, bit for bit (generation is seeded per step)
    train(RLTask(), _args(tmp_path, tmp_path / "b", tiny_llama_dir), progress=False, stop_at=2)
    train(RLTask(), _args(tmp_path, tmp_path / "b", tiny_llama_dir), resume=True, progress=False)
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_rl(tiny_chat_dir, tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": words(random.Random(i), 3)}], "answer": "7"} for i in range(6)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    rc = main(["rl", "--model", str(tiny_chat_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1",
               "--num-generations", "2", "--max-new-tokens", "3", "--reward", "exact-number",
               "--reward", "format:w\\d+.*=0.5", "--algo", "rloo", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 1 and "eval_reward/exact-number" in out["after"]
    rc = main(["rl", "--model", str(tiny_chat_dir), "--data", str(data), "--out", str(tmp_path / "q"),
               "--reward", "bogus"])
    assert rc == 2 and "unknown reward" in capsys.readouterr().err


def test_a_completion_depends_on_its_seed_not_on_its_batch(tiny_llama_dir):
    """RL samples each completion from its own generator (seeded by run seed, data position, number): the same
    tokens whether its prompt is decoded alone or in a ragged batch with others (what makes 2 ranks x B prompts
    sample as 1 x 2B), and other tokens at another position."""
    from aigckit.text.engine import generate
    from aigckit.text.lm import load_lm
    from aigckit.text.params import GenerationParams
    from aigckit.tune.grpo import _generators, row_seed

    lm = load_lm(tiny_llama_dir, kernels="torch")
    p = GenerationParams(max_new_tokens=8, temperature=1.0, num_return_sequences=2, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]

    def tokens(results):
        return [list(s.token_ids) for r in results for s in r.sequences]

    batch = tokens(generate(lm.model, lm.tokenizer, prompts, p, "", _generators(3, 10, 3, 2)))
    alone = tokens(generate(lm.model, lm.tokenizer, prompts[1:2], p, "", _generators(3, 11, 1, 2)))
    assert alone == batch[2:4] and alone[0] != alone[1]
    assert tokens(generate(lm.model, lm.tokenizer, prompts[1:2], p, "", _generators(3, 12, 1, 2))) != alone
    assert len({row_seed(0, i, j) for i in range(100) for j in range(8)}) == 800
    assert all(0 <= row_seed(2**40, i, 3) < 2**62 for i in range(10))
