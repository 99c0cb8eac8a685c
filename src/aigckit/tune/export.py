"""``aigc lora merge``: a base model with an adapter merged, written as a plain Hugging Face folder.

The weights go through ``text/weights.py``'s name tables backwards (our fused ``qkv`` / ``gate_up`` are split into
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``, GPT-2's Conv1D weights transposed back), so the folder
loads in aigckit (``load_lm(OUT)``) and in transformers (``AutoModelForCausalLM.from_pretrained(OUT)``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from aigckit.errors import AigcError
from aigckit.text.config import LMConfig
from aigckit.text.weights import HF_GPT2, HF_LLAMA, _fmt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def _split_sizes(cfg: LMConfig, ours: str) -> list[int]:
    if ours.endswith("attn.qkv.weight"):
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    return [cfg.intermediate_size, cfg.intermediate_size]  # mlp.gate_up


def to_hf_state_dict(cfg: LMConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> HF tensor names, inverting the load-side table."""
    table = HF_LLAMA if cfg.arch == "llama" else HF_GPT2
    out: dict[str, Tensor] = {}

    def put(recipe, t: Tensor, ours: str) -> None:
        if isinstance(recipe, str):
            out[recipe] = t.contiguous()
        elif recipe[0] == "T":
            put(recipe[1], t.t(), ours)
        elif recipe[0] == "cat":
            for r, part in zip(recipe[1], torch.split(t, _split_sizes(cfg, ours), dim=0)):
                put(r, part, ours)
        else:  # pragma: no cover - the HF tables use only the ops above
            raise AssertionError(recipe)

    for ours, recipe in table.items():
        if (ours == "lm_head.weight" and cfg.tie_embeddings) or (ours == "pos_emb.weight" and cfg.arch != "gpt2"):
            continue
        for i in range(cfg.n_layer) if "{}" in ours else [None]:
            name = ours.format(i) if i is not None else ours
            put(_fmt(recipe, i), sd[name], name)
    return out


def hf_config(cfg: LMConfig) -> dict:
    if cfg.arch == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
                "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
                "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "torch_dtype": "float32"}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.block_size,
            "n_inner": cfg.intermediate_size, "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "torch_dtype": "float32"}


def _write_tokenizer(lm, source: Path, dst: Path) -> None:
    if source.is_dir():  # an HF folder: its own tokenizer files, unchanged
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, dst / name)
        return
    tok = lm.tokenizer  # a GGUF: the tokenizer it carries, as tokenizer.json + tokenizer_config.json
    tok._tok.save(str(dst / "tokenizer.json"))
    conf = {k: v for k, v in tok.special_tokens.items() if v is not None}
    if tok.chat_template:
        conf["chat_template"] = tok.chat_template
    conf.update(add_bos_token=tok.add_bos_token, add_eos_token=tok.add_eos_token)
    (dst / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))


def merge_to_hf(model: str | None, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Load ``model`` with ``adapter`` merged and write an HF folder to ``out`` (atomically); returns ``out``."""
    from safetensors.torch import save_file

    from aigckit.text.lm import load_lm

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise AigcError(f"{out} exists and is not empty: choose another --out", param="out")
    lm = load_lm(model, kernels="torch", adapter=adapter)
    cfg = lm.config
    sd = to_hf_state_dict(cfg, {k: v.detach() for k, v in lm.model.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
        _write_tokenizer(lm, Path(lm.source), tmp)
        (tmp / "aigc_merge.json").write_text(json.dumps({"base": lm.source, "adapter": str(adapter)}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
