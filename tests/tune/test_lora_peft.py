"""LoRA layers against peft, both directions, on a tiny random Llama (and GPT-2 for the unfused layout)."""

from __future__ import annotations

import json

import pytest
import torch

from aigckit.errors import AigcError, CorruptFileError
from aigckit.text.adapter import merge_adapter, read_adapter
from aigckit.text.lm import load_lm
from aigckit.tune.lora import (LoraConfig, add_lora, adapters_disabled, attach_adapter, lora_parameters, merge_into_base,
                               merged_model, save_adapter)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[5, 17, 3, 44, 9, 12, 80, 7, 1, 33]])


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "o_proj", "up_proj", "down_proj"],
                                     "all-linear"])
def test_ours_to_peft(tiny_llama_dir, tmp_path, targets):
    lm = load_lm(tiny_llama_dir, kernels="torch")
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets)
    add_lora(lm.model, cfg)
    _randomise(lm.model)
    with torch.no_grad():
        ours = lm.model(TOKENS)
        with adapters_disabled(lm.model):
            base = lm.model(TOKENS)
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    save_adapter(lm.model, tmp_path / "ad", cfg, str(tiny_llama_dir))
    theirs = peft.PeftModel.from_pretrained(_hf(tiny_llama_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        ref = theirs(TOKENS).logits
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # merged at load (load_lm(adapter=)) and merged into a copy (for generation) give the same logits
    merged = load_lm(tiny_llama_dir, kernels="torch", adapter=tmp_path / "ad")
    assert merged.run_config["adapter"] == str(tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(TOKENS), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(merged_model(lm.model)(TOKENS), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(merge_into_base(lm.model)(TOKENS), ref, atol=2e-5, rtol=1e-4)


def test_peft_to_ours(tiny_llama_dir, tmp_path):
    hf = _hf(tiny_llama_dir)
    pc = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                         init_lora_weights=False, use_rslora=True)  # random B too
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, pc).eval()
    with torch.no_grad():
        ref = pm(TOKENS).logits
    pm.save_pretrained(tmp_path / "ad")
    lm = load_lm(tiny_llama_dir, kernels="torch")
    attach_adapter(lm.model, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(TOKENS), ref, atol=2e-5, rtol=1e-4)
    merged = load_lm(tiny_llama_dir, adapter=tmp_path / "ad")  # fast kernels, merged at load
    with torch.no_grad():
        torch.testing.assert_close(merged.model(TOKENS), ref, atol=2e-5, rtol=1e-4)
    # the merged model generates what peft's model generates (greedy)
    out = merged.generate(TOKENS[0].tolist(), max_new_tokens=6, temperature=0)
    with torch.no_grad():
        peft_ids = pm.generate(TOKENS, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, TOKENS.shape[1]:]
    assert out.token_ids == peft_ids.tolist()[:len(out.token_ids)]


def test_gpt2_both_directions(tiny_gpt2_dir, tmp_path):
    hf = _hf(tiny_gpt2_dir)
    pc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                         fan_in_fan_out=True)
    torch.manual_seed(4)
    pm = peft.get_peft_model(hf, pc).eval()
    with torch.no_grad():
        ref = pm(TOKENS).logits
    pm.save_pretrained(tmp_path / "ad")
    lm = load_lm(tiny_gpt2_dir, kernels="torch")
    lcfg = attach_adapter(lm.model, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(TOKENS), ref, atol=2e-5, rtol=1e-4)
    save_adapter(lm.model, tmp_path / "back", lcfg)
    again = peft.PeftModel.from_pretrained(_hf(tiny_gpt2_dir), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, ref, atol=2e-5, rtol=1e-4)


def test_bad_adapters(tiny_llama_dir, tmp_path):
    with pytest.raises(AigcError, match="not a LoRA adapter folder"):
        load_lm(tiny_llama_dir, adapter=tmp_path)
    lm = load_lm(tiny_llama_dir, kernels="torch")
    with pytest.raises(AigcError, match="match no linear"):
        add_lora(lm.model, LoraConfig(target_modules=["nope_proj"]))
    with pytest.raises(AigcError, match="lora rank"):
        LoraConfig(r=0)
    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    add_lora(lm.model, cfg)
    save_adapter(lm.model, tmp_path / "ad", cfg)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(AigcError, match="use_dora"):
        load_lm(tiny_llama_dir, adapter=tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(conf))
    ad = read_adapter(tmp_path / "ad")  # an adapter made for other shapes
    name = next(iter(ad.weights))
    ad.weights[name] = (ad.weights[name][0][:, :5], ad.weights[name][1])
    with pytest.raises(CorruptFileError, match="this model wants"):
        merge_adapter(load_lm(tiny_llama_dir).model, ad)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_lora_merge_cli_writes_an_hf_folder(tiny_llama_dir, tiny_gpt2_dir, tmp_path, which):
    from aigckit.cli import main

    base = tiny_llama_dir if which == "llama" else tiny_gpt2_dir
    lm = load_lm(base, kernels="torch")
    cfg = LoraConfig(r=2, target_modules="all-linear")
    add_lora(lm.model, cfg)
    _randomise(lm.model)
    with torch.no_grad():
        ref = lm.model(TOKENS)
    save_adapter(lm.model, tmp_path / "ad", cfg)
    assert main(["lora", "merge", "--model", str(base), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_lm(tmp_path / "m", kernels="torch").model(TOKENS), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(_hf(tmp_path / "m")(TOKENS).logits, ref, atol=2e-5, rtol=1e-4)
    assert main(["lora", "merge", "--model", str(base), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m")]) == 2  # never over a folder with files


def test_target_patterns(tiny_llama_dir):
    from aigckit.cli.tune import _targets
    from aigckit.text.adapter import match_targets

    cfg = load_lm(tiny_llama_dir, kernels="torch").config
    rx = _targets(r"re:model\.layers\.1\..*_proj")
    assert isinstance(rx, str)
    assert {t.hf for t in match_targets(cfg, rx)} == {f"model.layers.1.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert [t.hf for t in match_targets(cfg, _targets("v_proj"))] == ["model.layers.0.self_attn.v_proj",
                                                                      "model.layers.1.self_attn.v_proj"]


def test_refresh_merged_follows_the_adapter(tiny_llama_dir):
    from aigckit.tune.lora import refresh_merged

    lm = load_lm(tiny_llama_dir, kernels="torch")
    add_lora(lm.model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    merged = merged_model(lm.model)
    shared = merged.blocks[0].attn.proj.weight  # not adapted: the base's own tensor
    assert shared.data_ptr() == lm.model.blocks[0].attn.proj.weight.data_ptr()
    _randomise(lm.model, seed=3)
    refresh_merged(merged, lm.model)
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS), lm.model(TOKENS), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(merged(TOKENS), merged_model(lm.model)(TOKENS), atol=0, rtol=0)
