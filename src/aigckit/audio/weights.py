"""Piper voice files (``*.onnx`` + ``*.onnx.json``) -> our ``VitsConfig`` and state dict, by an explicit name table.

Only the ONNX file's initializers are read (with the ``onnx`` package); the graph is never executed. It is read in
two more ways, both explicit:

- **hyper-parameters** come from initializer shapes and the attributes of named Conv / ConvTranspose nodes
  (kernel sizes, strides, dilations), so every Piper quality level that uses our blocks loads without a preset;
- **tensors whose initializer lost its name** at export (PyTorch folds weight-norm into anonymous ``onnx::Conv_NNNN``
  constants, the text embedding is exported as ``sid``, and ``exp(-logs)`` of the duration flow's affine layer is
  constant-folded) are found by following the graph: the table names the node and the input slot that consumes them.

Loading is strict: every parameter of the model must be filled, with the right shape, and every weight-like
initializer of the file must be used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aigckit.audio.vits import VitsConfig, VitsModel
from aigckit.errors import AigcError, CorruptFileError, UnsupportedFormatError

# --------------------------------------------------------------------------------------------- the name table


@dataclass(frozen=True)
class FromNode:
    """The initializer feeding input ``slot`` of the graph node ``node`` (for tensors exported without a name)."""

    node: str
    slot: int
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    why: str = ""


def _neg_log(a: np.ndarray) -> np.ndarray:
    return -np.log(a)


# Our parameter name -> where it is in the ONNX file. Names not listed are identical in both (VITS' own module names,
# e.g. "enc_p.encoder.attn_layers.0.conv_q.weight"). {i} is a flow index (0, 2, 4, ...: the couplings between the
# Flips), {j} a WaveNet layer.
NODE_TABLE: dict[str, FromNode] = {
    "enc_p.emb.weight": FromNode("/enc_p/emb/Gather", 0, why="exported under the name 'sid'"),
    "flow.flows.{i}.enc.in_layers.{j}.weight": FromNode(
        "/flow/flows.{i}/enc/in_layers.{j}/Conv", 1, why="weight-norm folded into an anonymous onnx::Conv_* constant"),
    "flow.flows.{i}.enc.res_skip_layers.{j}.weight": FromNode(
        "/flow/flows.{i}/enc/res_skip_layers.{j}/Conv", 1, why="weight-norm folded into an anonymous constant"),
    "dp.flows.0.logs": FromNode(
        "/dp/flows.0/Mul", 1, transform=_neg_log,
        why="the reverse pass uses exp(-logs); the export folded it to a constant"),
}

# ONNX initializers that are parameters the inference graph carries but never uses at inference: none for Piper's
# single-speaker VITS. Anything named like a module parameter (has a '.') must be consumed.


def _expand_table(cfg: VitsConfig) -> dict[str, FromNode]:
    out: dict[str, FromNode] = {}
    for ours, src in NODE_TABLE.items():
        if "{i}" in ours:
            for i in range(0, 2 * cfg.flow_n_flows, 2):
                for j in range(cfg.flow_n_layers):
                    out[ours.format(i=i, j=j)] = FromNode(src.node.format(i=i, j=j), src.slot, src.transform, src.why)
        else:
            out[ours] = src
    return out


# ----------------------------------------------------------------------------------------------- voice files


@dataclass(frozen=True)
class VoiceFiles:
    onnx: Path
    config: Path


def find_voice_files(path: Path) -> VoiceFiles:
    """A folder with exactly one ``*.onnx`` (+ its ``.onnx.json``), or the ``.onnx`` file itself."""
    if path.is_dir():
        onnx_files = sorted(path.glob("*.onnx"))
        if len(onnx_files) != 1:
            raise AigcError(f"{path}: expected one Piper voice (*.onnx) in the folder, found {len(onnx_files)}")
        path = onnx_files[0]
    if path.suffix != ".onnx" or not path.is_file():
        raise AigcError(f"{path}: not a Piper voice (expected a .onnx file or a folder with one)")
    cfg = path.with_name(path.name + ".json")
    if not cfg.is_file():
        raise AigcError(f"{path}: its voice config {cfg.name} is missing (Piper voices come as .onnx + .onnx.json)")
    return VoiceFiles(path, cfg)


def read_voice_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not a readable voice config ({e})") from e
    for key in ("audio", "phoneme_id_map", "num_symbols"):
        if key not in d:
            raise CorruptFileError(f"{path}: voice config has no {key!r}")
    if d.get("phoneme_type", "espeak") != "espeak":
        raise UnsupportedFormatError(f"{path}: phoneme_type {d['phoneme_type']!r} is not supported (only 'espeak')")
    if int(d.get("num_speakers", 1)) != 1:
        raise UnsupportedFormatError(f"{path}: multi-speaker voices ({d['num_speakers']} speakers) are not "
                                     "supported yet")
    return d


# ------------------------------------------------------------------------------------------------ ONNX reading


class OnnxWeights:
    """The initializers of an ONNX file as numpy arrays, plus the node lookups the table needs."""

    def __init__(self, path: Path):
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError as e:  # pragma: no cover - onnx is a dependency
            raise AigcError("reading Piper voices needs the 'onnx' package (pip install onnx)") from e
        try:
            model = onnx.load(str(path))
        except Exception as e:  # onnx raises DecodeError and friends from protobuf
            raise CorruptFileError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from e
        g = model.graph
        self.path = path
        self.arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.nodes = {n.name: n for n in g.node}
        self.input_names = [i.name for i in g.input]

    def node(self, name: str):
        n = self.nodes.get(name)
        if n is None:
            raise UnsupportedFormatError(f"{self.path}: graph node {name!r} not found; not a Piper VITS export we know")
        return n

    def attr(self, node: str, name: str):
        from onnx import helper

        for a in self.node(node).attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        raise UnsupportedFormatError(f"{self.path}: node {node!r} has no attribute {name!r}")

    def input_of(self, node: str, slot: int) -> tuple[str, np.ndarray]:
        n = self.node(node)
        if slot >= len(n.input) or n.input[slot] not in self.arrays:
            raise UnsupportedFormatError(f"{self.path}: input {slot} of node {node!r} is not an initializer")
        return n.input[slot], self.arrays[n.input[slot]]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.arrays:
            raise UnsupportedFormatError(f"{self.path}: initializer {name!r} not found; "
                                         "not a Piper VITS export we know")
        return tuple(self.arrays[name].shape)


def _count(names, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for n in names if (m := rx.match(n))})


def config_from_onnx(w: OnnxWeights, sample_rate: int) -> VitsConfig:
    """Read the hyper-parameters off initializer shapes and node attributes (see the module docstring)."""
    names = list(w.arrays) + list(w.nodes)
    if "sid" in w.input_names:
        raise UnsupportedFormatError(f"{w.path}: multi-speaker voices are not supported yet")
    n_vocab, hidden = w.input_of("/enc_p/emb/Gather", 0)[1].shape
    n_layers = _count(names, r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight$")
    _, n_rel, k_channels = w.shape("enc_p.encoder.attn_layers.0.emb_rel_k")
    filter_channels, _, kernel_size = w.shape("enc_p.encoder.ffn_layers.0.conv_1.weight")
    inter2 = w.shape("enc_p.proj.weight")[0]
    dp_fc = w.shape("dp.pre.weight")[0]
    dp_kernel = w.shape("dp.convs.convs_sep.0.weight")[2]
    dp_proj_out = w.shape("dp.flows.3.proj.weight")[0]  # half(=1) * (3 * bins - 1)
    dp_n_flows = _count(names, r"dp\.flows\.(\d+)\.pre\.weight$") + 1  # flows.1 is dropped from the inference graph
    flow_idx = sorted({int(m.group(1)) for n in names if (m := re.match(r"flow\.flows\.(\d+)\.pre\.weight$", n))})
    flow_hidden = w.shape("flow.flows.0.pre.weight")[0]
    flow_n_layers = _count(names, r"/flow/flows\.0/enc/in_layers\.(\d+)/Conv$")
    flow_kernel = int(w.attr("/flow/flows.0/enc/in_layers.0/Conv", "kernel_shape")[0])
    flow_dil = int(w.attr("/flow/flows.0/enc/in_layers.1/Conv", "dilations")[0]) if flow_n_layers > 1 else 1
    n_ups = _count(names, r"dec\.ups\.(\d+)\.weight$")
    ups_rates = tuple(int(w.attr(f"/dec/ups.{i}/ConvTranspose", "strides")[0]) for i in range(n_ups))
    ups_kernels = tuple(int(w.shape(f"dec.ups.{i}.weight")[2]) for i in range(n_ups))
    n_res = _count(names, r"dec\.resblocks\.(\d+)\.convs\.0\.weight$") // n_ups
    if _count(names, r"dec\.resblocks\.0\.(convs1)\.") or not n_res:
        raise UnsupportedFormatError(f"{w.path}: HiFi-GAN resblock type 1 voices are not supported yet")
    res_kernels = tuple(int(w.shape(f"dec.resblocks.{j}.convs.0.weight")[2]) for j in range(n_res))
    n_convs = _count(names, r"dec\.resblocks\.0\.convs\.(\d+)\.weight$")
    res_dils = tuple(tuple(int(w.attr(f"/dec/resblocks.{j}/convs.{c}/Conv", "dilations")[0]) for c in range(n_convs))
                     for j in range(n_res))
    if (dp_proj_out + 1) % 3:
        raise UnsupportedFormatError(f"{w.path}: duration-flow projection of {dp_proj_out} channels is not 3K-1")
    return VitsConfig(
        n_vocab=int(n_vocab), hidden_channels=int(hidden), inter_channels=int(inter2 // 2),
        filter_channels=int(filter_channels), n_heads=int(hidden // k_channels), n_layers=n_layers,
        kernel_size=int(kernel_size), window_size=int((n_rel - 1) // 2),
        dp_filter_channels=int(dp_fc), dp_kernel_size=int(dp_kernel), dp_n_flows=dp_n_flows,
        dp_num_bins=int((dp_proj_out + 1) // 3), dp_tail_bound=5.0,
        flow_n_flows=len(flow_idx), flow_hidden_channels=int(flow_hidden), flow_kernel_size=flow_kernel,
        flow_dilation_rate=flow_dil, flow_n_layers=flow_n_layers,
        upsample_initial_channel=int(w.shape("dec.conv_pre.weight")[0]), upsample_rates=ups_rates,
        upsample_kernel_sizes=ups_kernels, resblock="2", resblock_kernel_sizes=res_kernels,
        resblock_dilation_sizes=res_dils, sample_rate=int(sample_rate),
    )


def state_dict_from_onnx(w: OnnxWeights, model: VitsModel) -> dict[str, torch.Tensor]:
    """Fill every parameter of ``model`` from the file, strictly (see the module docstring)."""
    table = _expand_table(model.cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    used: set[str] = set()
    sd: dict[str, torch.Tensor] = {}
    for name, shape in want.items():
        if name in table:
            src = table[name]
            onnx_name, arr = w.input_of(src.node, src.slot)
            if src.transform is not None:
                arr = src.transform(arr)
        else:
            onnx_name = name
            if name not in w.arrays:
                raise UnsupportedFormatError(f"{w.path}: no initializer for parameter {name!r}")
            arr = w.arrays[name]
        if tuple(arr.shape) != shape:
            raise CorruptFileError(f"{w.path}: {onnx_name} has shape {tuple(arr.shape)}, {name} needs {shape}")
        if arr.dtype != np.float32:
            raise UnsupportedFormatError(f"{w.path}: {onnx_name} is {arr.dtype}, only float32 voices are supported")
        if not np.isfinite(arr).all():
            raise CorruptFileError(f"{w.path}: {onnx_name} has non-finite values")
        sd[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        used.add(onnx_name)
    # graph constants (shapes, axes, scalars) are named "/..." or are integer tensors; everything else is a weight
    unused = sorted(n for n, a in w.arrays.items() if n not in used and a.dtype == np.float32 and a.ndim >= 1
                    and not n.startswith("/"))
    if unused:
        raise UnsupportedFormatError(f"{w.path}: weights our model does not use: {', '.join(unused[:5])}"
                                     f"{' ...' if len(unused) > 5 else ''}")
    return sd


def load_vits(onnx_path: Path, sample_rate: int) -> VitsModel:
    """Build the model on the meta device, then load the file's weights with ``assign=True``."""
    w = OnnxWeights(onnx_path)
    cfg = config_from_onnx(w, sample_rate)
    with torch.device("meta"):
        model = VitsModel(cfg)
    sd = state_dict_from_onnx(w, model)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()

