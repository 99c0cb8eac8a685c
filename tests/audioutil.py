"""Tiny random VITS voices for unit tests, and a writer of synthetic Piper-style ONNX files (initializers laid out
the way Piper's export lays them out, including the anonymous ones the loader finds through graph nodes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from aigckit.audio.vits import VitsConfig, VitsModel
from aigckit.audio.voice import Voice

# Phonemes of the tiny voices: Piper's specials, punctuation, letters and the IPA symbols espeak-ng uses for English.
SYMBOLS = (["_", "^", "$", " ", "!", "'", "(", ")", ",", "-", ".", ":", ";", "?"] + list("abcdefghijklmnopqrstuvwxyz")
           + list("æçðøŋœɐɑɒɔəɚɛɜɡɪɫɹɾʃʊʌʒʔˈˌːθᵻɬɣχβʍɯɨ") + ["\u0303", "\u0329", "\u032a", "\u032f"])
ID_MAP = {s: [i] for i, s in enumerate(SYMBOLS)}


def tiny_config(**kw) -> VitsConfig:
    base = dict(n_vocab=len(SYMBOLS) + 4, hidden_channels=16, inter_channels=8, filter_channels=32, n_heads=2,
                n_layers=2, kernel_size=3, window_size=2, dp_filter_channels=16, dp_kernel_size=3, dp_n_flows=4,
                dp_num_bins=10, flow_n_flows=2, flow_hidden_channels=16, flow_kernel_size=5, flow_n_layers=2,
                upsample_initial_channel=32, upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4),
                resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 2), (2, 3)), sample_rate=8000)
    base.update(kw)
    return VitsConfig(**base)


def tiny_model(seed: int = 0, **kw) -> VitsModel:
    """Random weights, with the duration flow's affine layer set so every phoneme lasts 1-4 frames."""
    torch.manual_seed(seed)
    model = VitsModel(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
        model.dp.flows[0].m.fill_(-5.0)  # log w = (z - m) * exp(-logs) lands in about [0, 1.4]
        model.dp.flows[0].logs.fill_(2.0)
    return model


def letters(text: str, voice: str = "en-us") -> str:
    """A stand-in phonemiser: the text's letters and spaces (no espeak needed)."""
    return "".join(c for c in text.lower() if c.isalpha() and c.isascii() or c == " ")


def tiny_voice_config(sample_rate: int = 8000) -> dict:
    return {"audio": {"sample_rate": sample_rate}, "espeak": {"voice": "en-us"}, "phoneme_type": "espeak",
            "inference": {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8}, "phoneme_id_map": ID_MAP,
            "num_symbols": len(SYMBOLS), "num_speakers": 1}


def tiny_voice(seed: int = 0, *, threads: int = 1, window_frames: int = 256, first_window_frames: int = 48,
               phonemizer=letters) -> Voice:
    return Voice("tiny", tiny_model(seed), tiny_voice_config(), threads=threads, window_frames=window_frames,
                 first_window_frames=first_window_frames,
                 phonemizer=phonemizer)


# --------------------------------------------------------------------------------------------- ONNX writer


def write_piper_onnx(model: VitsModel, folder: Path, name: str = "tiny") -> Path:
    """Save ``model`` as ``folder/name.onnx`` + ``.onnx.json`` with Piper's initializer naming (not a runnable
    graph: only the nodes the loader follows are present)."""
    import onnx
    from onnx import helper, numpy_helper

    from aigckit.audio.weights import _expand_table

    cfg = model.cfg
    table = _expand_table(cfg)
    inits, nodes = [], []
    for i, (key, t) in enumerate(model.state_dict().items()):
        arr = t.detach().numpy().astype(np.float32)
        if key in table:
            src = table[key]
            if key == "enc_p.emb.weight":
                init_name, op = "sid", "Gather"
            elif key == "dp.flows.0.logs":
                init_name, op, arr = "/dp/flows.0/Exp_output_0", "Mul", np.exp(-arr)
            else:
                init_name, op = f"onnx::Conv_{9000 + i}", "Conv"
            inputs = ["x"] * src.slot + [init_name] + (["input"] if op == "Gather" else [])
            attrs = {}
            if op == "Conv":
                conv = model.get_submodule(key.rsplit(".", 1)[0])
                attrs = dict(kernel_shape=[conv.kernel_size[0]], dilations=[conv.dilation[0]],
                             pads=[conv.padding[0]] * 2, strides=[1], group=1)
            nodes.append(helper.make_node(op, inputs, [src.node + "_out"], name=src.node, **attrs))
        else:
            init_name = key
        inits.append(numpy_helper.from_array(arr, init_name))
    for i, up in enumerate(model.dec.ups):
        nodes.append(helper.make_node("ConvTranspose", ["x", f"dec.ups.{i}.weight"], [f"u{i}"],
                                      name=f"/dec/ups.{i}/ConvTranspose", strides=[up.stride[0]],
                                      kernel_shape=[up.kernel_size[0]]))
    for j, block in enumerate(model.dec.resblocks):
        for c, conv in enumerate(block.convs):
            nodes.append(helper.make_node("Conv", ["x", f"dec.resblocks.{j}.convs.{c}.weight"], [f"r{j}{c}"],
                                          name=f"/dec/resblocks.{j}/convs.{c}/Conv", dilations=[conv.dilation[0]],
                                          kernel_shape=[conv.kernel_size[0]]))
    inits.append(numpy_helper.from_array(np.array(3, np.int64), "/Constant_output_0"))  # a graph constant
    graph = helper.make_graph(nodes, "piper-like", [
        helper.make_tensor_value_info("input", onnx.TensorProto.INT64, [1, "phonemes"]),
        helper.make_tensor_value_info("input_lengths", onnx.TensorProto.INT64, [1]),
        helper.make_tensor_value_info("scales", onnx.TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)], initializer=inits)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(helper.make_model(graph), str(path))
    (folder / f"{name}.onnx.json").write_text(json.dumps(tiny_voice_config(cfg.sample_rate)))
    return path


def saved_tiny_voice(tmp_path_factory, seed: int = 0) -> Path:
    """A tiny random voice saved as a Piper-style folder (``tiny.onnx`` + ``.onnx.json``), for the CLI and server."""
    d = tmp_path_factory.mktemp("voice") / "tiny"
    write_piper_onnx(tiny_model(seed=seed), d)
    return d
