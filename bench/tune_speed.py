"""LoRA SFT training speed, side by side in one run: aigckit (tune/) vs transformers + peft, same weights, data,
batch and LoRA config, interleaved rounds (A B A B ...; each side keeps its best round: the VM is shared).

One training step = forward on a [batch, seq] block of text tokens, next-token cross-entropy, backward into the
LoRA weights, gradient clipping, AdamW step. Both models are float32 with torch's CPU kernels; transformers' model is
built from the very same tensors (our weights through ``tune/export.py``'s HF name table), so the work is identical.
Also reports both sides' loss on the first batch (they must agree) and the held-out loss is not part of this bench.

``--chat``: chat SFT data instead (what ``aigc finetune`` trains on): chats through the model's chat template, packed
into [batch, seq] blocks, loss on the assistant tokens only (labels -100 elsewhere, for both sides). Ours runs the
trainer's loss (``tune.trainer.sum_nll``: the head only at labelled positions), theirs ``model(input_ids,
labels=labels).loss`` (transformers' loss, the head at every position), the same mean over the same tokens.

    .venv/bin/python bench/tune_speed.py --threads 2 --rounds 3 --steps 4 --json bench/tune_speed.json
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_GGUF = Path(os.environ.get("AIGC_HOME", Path.home() / ".cache/aigckit")) / \
    "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of science is the study of the development of science and scientific knowledge, including both "
        "the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
        "the natural world, produced by scientists who emphasize the observation, explanation, and prediction of "
        "real-world phenomena. ")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(tok, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    ids = tok.encode(TEXT * 200)
    need = n * batch * seq
    ids = (ids * (need // len(ids) + 1))[:need]
    return list(torch.tensor(ids).view(n, batch, seq))


def chat_batches(tok, n: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[batch, seq] blocks of packed chats (a question, a longer answer), labels on the assistant turns only."""
    from aigckit.tune.data import chat_example, pack

    words = TEXT.split()
    exs = []
    for i in range(n * batch * seq // 40 + 8):
        q = " ".join(words[i % 20:i % 20 + 8])
        a = " ".join(words[(3 * i) % 30:(3 * i) % 30 + 24])
        exs.append(chat_example(tok, [{"role": "user", "content": f"Continue: {q}"},
                                      {"role": "assistant", "content": a}], f"row {i}"))
    blocks = [e for e in pack(exs, seq) if len(e.ids) == seq][:n * batch]
    ids = torch.tensor([e.ids for e in blocks]).view(n, batch, seq)
    labels = torch.tensor([e.labels for e in blocks]).view(n, batch, seq)
    return list(zip(ids, labels))


def build_ours(gguf: str, a):
    from aigckit.text.lm import load_lm
    from aigckit.tune.lora import LoraConfig, add_lora, lora_parameters

    lm = load_lm(gguf, kernels="torch")
    add_lora(lm.model, LoraConfig(r=a.rank, alpha=2 * a.rank, target_modules=TARGETS), torch.Generator().manual_seed(0))
    lm.model.train()
    params = lora_parameters(lm.model)
    return lm, lm.model, params


def build_theirs(lm, a):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    from aigckit.tune.export import hf_config, to_hf_state_dict

    base = {k.replace(".base.", "."): v.detach() for k, v in lm.model.state_dict().items() if ".lora." not in k}
    cfg = AutoConfig.for_model(**hf_config(lm.config))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = to_hf_state_dict(lm.config, base)
    if lm.config.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, assign=True, strict=False)
    hf.tie_weights()
    hf.model.rotary_emb.__init__(cfg)  # buffers built on meta: rebuild on the CPU
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS,
                                                 lora_dropout=0.0))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    return pm, params


def step(loss_fn, params, opt, batch) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chat", action="store_true", help="chat SFT data, loss on assistant tokens only (see above)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm, ours, ours_params = build_ours(a.gguf, a)
    theirs, their_params = build_theirs(lm, a)
    from aigckit.tune.trainer import sum_nll

    if a.chat:
        data = chat_batches(lm.tokenizer, a.steps, a.batch, a.seq)
    else:
        data = [(x, x) for x in batches(lm.tokenizer, a.steps, a.batch, a.seq)]

    def our_loss(b):
        ids, labels = b
        return sum_nll(ours, ids, labels) / (labels[:, 1:] != -100).sum()

    def their_loss(b):
        ids, labels = b
        return theirs(input_ids=ids, labels=labels).loss

    with torch.no_grad():  # same weights, same LoRA init semantics (B = 0): the same loss before training
        l0, l1 = our_loss(data[0]).item(), their_loss(data[0]).item()
    print(f"first-batch loss: aigckit {l0:.5f}  transformers+peft {l1:.5f}", file=sys.stderr)
    sides = {
        "aigckit": (our_loss, ours_params, torch.optim.AdamW(ours_params, lr=1e-4)),
        "transformers+peft": (their_loss, their_params, torch.optim.AdamW(their_params, lr=1e-4)),
    }
    for name, (fwd, params, opt) in sides.items():  # warm-up step each (allocator, oneDNN primitives)
        step(fwd, params, opt, data[0])
    best: dict[str, float] = {}
    tokens = a.steps * a.batch * a.seq
    for r in range(a.rounds):
        for name, (fwd, params, opt) in sides.items():
            t = time.perf_counter()
            for b in data:
                step(fwd, params, opt, b)
            tps = tokens / (time.perf_counter() - t)
            best[name] = max(best.get(name, 0.0), tps)
            print(f"round {r + 1}: {name:<18} {tps:8.1f} tokens/s", file=sys.stderr)
    out = {"tokens_per_s": {k: round(v, 1) for k, v in best.items()},
           "speedup": round(best["aigckit"] / best["transformers+peft"], 3),
           "first_batch_loss": {"aigckit": l0, "transformers+peft": l1},
           "setup": {"batch": a.batch, "seq": a.seq, "rank": a.rank, "targets": TARGETS, "threads": a.threads,
                     "rounds": a.rounds, "steps": a.steps, "dtype": "float32", "torch": torch.__version__,
                     "chat": a.chat, "labelled_share": round(float(sum((b[1][:, 1:] != -100).sum() for b in data))
                                                             / (len(data) * a.batch * (a.seq - 1)), 3),
                     "cpu": os.uname().machine, "cpus": os.cpu_count()}}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
