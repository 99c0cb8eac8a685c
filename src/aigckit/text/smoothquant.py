"""SmoothQuant (Xiao et al., 2023) for the ``w8a8`` mode: move activation outliers into the weights before quantising.

A few channels of a transformer's residual stream are much larger than the rest, so one int8 scale per activation
row wastes most of its range on them. For a linear ``y = x W^T`` and any positive per-channel ``s``,
``y = (x / s) (W diag(s))^T`` exactly; with ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` both factors become
easy to quantise. The division by ``s`` is folded into whatever produces ``x``, so it costs nothing at run time:

* q/k/v and gate/up read an RMSNorm output: divide the norm's weight by ``s``;
* down reads ``silu(gate) * up``: divide the *up* rows by ``s`` (the product is linear in ``up``);
* the output head reads the final RMSNorm: same as q/k/v, after giving the head its own copy of a tied embedding.

``max|x_j|`` comes from running the float model once over a fixed calibration text (deterministic). Llama-family
blocks only (GPT-2's LayerNorm bias and GELU input would need other folds); other blocks are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from aigckit.text.model import RMSNorm, Transformer

CALIBRATION_TEXT = (
    "The history of science covers the development of science from ancient times to the present. It encompasses "
    "all three major branches of science: natural, social, and formal. Protoscience, early sciences, and natural "
    "philosophies such as alchemy and astrology existed during the Bronze Age, Iron Age, classical antiquity and "
    "the Middle Ages.\n\nUser: Can you write a short poem about the sea?\nAssistant: The sea is wide, the sea is "
    "deep, it sings the sailors off to sleep.\n\ndef mean(values):\n    return sum(values) / len(values)\n\n"
    "Prices rose 3.4% in March, the fastest pace since 2021; analysts expect the central bank to hold rates at "
    "5.25% when it meets on 12 June. Meanwhile, in Paris, Berlin and Tokyo, markets closed higher."
)


@torch.no_grad()
def activation_absmax(model: Transformer, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max|x|`` of every block's qkv, gate_up and down linears (keys ``"{block}.{name}"``) and of
    the output head (``"head"``) over ``token_ids``."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for name, mod in (("qkv", block.attn.qkv), ("gate_up", getattr(block.mlp, "gate_up", None)),
                          ("down", getattr(block.mlp, "down", None))):
            if mod is None:
                continue
            key = f"{i}.{name}"

            def hook(_m, inp, _out, key=key):
                a = inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs().amax(dim=0)
                stats[key] = torch.maximum(stats[key], a) if key in stats else a

            hooks.append(mod.register_forward_hook(hook))

    def head_hook(_m, inp, _out):
        stats["head"] = inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs().amax(dim=0)

    hooks.append(model.lm_head.register_forward_hook(head_hook))
    try:
        model(torch.tensor([token_ids]))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _scales(x_max: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = w.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_llama(model: Transformer, token_ids: list[int], alpha: float = 0.5) -> int:
    """Apply the folds described above to every Llama block of a float ``model`` (in place). Returns how many
    linears were smoothed. The model's float outputs are unchanged up to rounding."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    stats = activation_absmax(model, token_ids)
    done = 0
    for i, block in enumerate(model.blocks):
        if not (isinstance(block.attn_norm, RMSNorm) and hasattr(block.mlp, "gate_up")):
            continue
        for norm, lin, key in ((block.attn_norm, block.attn.qkv, "qkv"), (block.mlp_norm, block.mlp.gate_up, "gate_up")):
            s = _scales(stats[f"{i}.{key}"], lin.weight, alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            lin.weight.mul_(s.to(lin.weight.dtype))
            done += 1
        down, gate_up = block.mlp.down, block.mlp.gate_up
        inter = down.in_features
        s = _scales(stats[f"{i}.down"], down.weight, alpha)
        gate_up.weight[inter:].div_(s[:, None].to(gate_up.weight.dtype))  # the up rows
        if gate_up.bias is not None:
            gate_up.bias[inter:].div_(s.to(gate_up.bias.dtype))
        down.weight.mul_(s.to(down.weight.dtype))
        done += 1
    if isinstance(model.norm, RMSNorm):  # the output head reads the final norm (untied first: see untie_head)
        untie_head(model)
        s = _scales(stats["head"], model.lm_head.weight, alpha)
        model.norm.weight.div_(s.to(model.norm.weight.dtype))
        model.lm_head.weight.mul_(s.to(model.lm_head.weight.dtype))
        done += 1
    return done


def untie_head(model: nn.Module) -> None:
    """Give ``lm_head`` its own weight tensor (quantising or smoothing it must not touch the embedding)."""
    if model.lm_head.weight is model.tok_emb.weight:
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone(), requires_grad=False)
