"""The decoder-only transformer: GPT-2 and Llama families in one readable file.

Variant differences are config fields (``LMConfig.arch``):
  gpt2  - learned positions, LayerNorm with bias, GELU(tanh) MLP, biases on all linears
  llama - RoPE (optional linear/llama3 scaling), RMSNorm, SwiGLU MLP, grouped-query attention, no biases
Both use a fused QKV projection (one matmul) and, for Llama, a fused gate/up projection; the weight tables in
``weights.py`` say how source checkpoints map onto these.

``forward(tokens, input_pos, cache, start) -> logits``:
  tokens    [B, T] token ids
  input_pos [T] (a contiguous range shared by all rows) or [B, T]: the cache *slot* each token is written to
  start     [B] first valid slot of each row (left padding / a row's own origin); positions seen by RoPE and by
            learned position embeddings are ``input_pos - start``; slots before ``start`` are masked out.
  prefix    [B, P, dim] input embeddings that replace the first P tokens' (a soft prompt: ClipCap's image prefix,
            ``aigckit.multimodal.prefixcap``); the tokens there are placeholders.
  logits_from  logits of positions ``logits_from..T-1`` only (``last_only`` / ``logits_at``: one position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigckit.layers import embedding
from aigckit.text.config import LMConfig
from aigckit.text.kernels import decode
from aigckit.text.kvcache import KVCache


@dataclass
class Step:
    """What every block of one forward call shares: the cache slots the new tokens go to (``input_pos``, a slice
    for a range shared by all rows), RoPE's cos/sin, the attention mask, the cache, its rows, and how many slots
    attention reads (``kv_len``)."""

    input_pos: Tensor | slice
    rope: tuple[Tensor, Tensor] | None
    mask: Tensor | None
    cache: KVCache | None
    rows: Tensor | None
    kv_len: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()  # lower precision: normalise in float32 like transformers, then cast back
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LMConfig) -> Tensor:
    """RoPE's inverse frequencies (float64, on the CPU even inside a ``torch.device("meta")`` build: a meta arange
    runs through torch's Python reference kernels, whose first use imports torch._dynamo, ~2 s of a load)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    kind = rs.get("rope_type")
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":  # frequency-dependent scaling (Llama 3.1)
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs.get("original_max_position_embeddings", 8192)
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > lo_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; cos/sin [B, T, 1, D]. HF 'rotate_half' convention (first half / second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


SMALL_T = 32  # below this many new tokens (decode, beam steps) the explicit grouped kernel is faster on CPU


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention for few queries with grouped-query heads, without repeating K/V.

    q [B, H, T, D]; k, v [B, Hkv, S, D]; mask [B, 1, T, S] bool or None. Query heads h*g..h*g+g-1 share KV head h."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    qg = q.reshape(B, Hkv, g * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [B, Hkv, g*T, S]
    if mask is not None:
        scores = scores.view(B, Hkv, g, T, S).masked_fill(~mask.unsqueeze(1), float("-inf")).view(B, Hkv, g * T, S)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    return torch.matmul(probs, v).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, qkv_out, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.use_rope = cfg.arch == "llama"

    def forward(self, x: Tensor, layer: int, step: Step) -> Tensor:
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        qkv = self.qkv(x)
        rope, cache = step.rope, step.cache
        if rope is not None:  # q and k are adjacent in the fused projection: rotate them in one go
            qk = apply_rope(qkv[..., :(nh + nkv) * hd].view(B, T, nh + nkv, hd), *rope)
            q, k = qk.split([nh, nkv], dim=2)
            v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd)
        else:
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if cache is not None:
            cache.write(layer, step.input_pos, k, v, step.rows)
            k, v = cache.read(layer, step.kv_len, step.rows, B)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)
        if T <= SMALL_T:
            y = grouped_attention(q, k, v, step.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, enable_gqa=nkv != nh)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.arch = cfg.arch
        if cfg.arch == "llama":  # SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused
            self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=cfg.bias)
            self.down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        else:  # GPT-2: proj(gelu_tanh(fc(x)))
            self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
            self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.arch == "llama":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def _norm(cfg: LMConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, layer: int, step: Step) -> Tensor:
        x = x + self.attn(self.attn_norm(x), layer, step)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_emb = embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (for tiny test models and training from scratch)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, std, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        if self.config.arch == "llama":
            self.inv_freq = rope_inv_freq(self.config).float()

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, cache: KVCache | None = None,
                start: Tensor | None = None, rows: Tensor | None = None, last_only: bool = False,
                logits_at: Tensor | None = None, prefix: Tensor | None = None,
                logits_from: int = 0) -> Tensor:
        B, T = tokens.shape
        dev = tokens.device
        if input_pos is None:
            input_pos = torch.arange(T, device=dev)
        pos2d = input_pos if input_pos.dim() == 2 else input_pos.unsqueeze(0).expand(B, T)
        # positions as seen by the model (relative to each row's own origin)
        pos = pos2d if start is None else pos2d - start[:, None]
        # the highest slot; with a cache, a shared range (contiguous, see KVCache.write) ends with its last entry,
        # read without a reduction, which would allocate: a decode step allocates nothing but its logits
        if not T:
            top = -1
        elif cache is not None and input_pos.dim() == 1:
            top = int(input_pos[-1])
        else:
            top = int(pos2d.max())
        kv_len = top + 1
        if cache is None and T != kv_len and input_pos.dim() == 1:
            raise ValueError("without a cache, input_pos must cover 0..T-1")
        if cache is not None and kv_len > cache.max_len:
            raise ValueError(f"position {kv_len - 1} is outside the cache ({cache.max_len} slots)")
        if (top if start is None else int(pos.max())) >= self.config.block_size:
            raise ValueError(f"sequence longer than the context window ({self.config.block_size} tokens)")
        if cache is not None and input_pos.dim() == 1 and rows is None:
            p0 = int(input_pos[0])  # shared contiguous positions: the cache writes a slice (read once here)
            input_pos = slice(p0, p0 + T)

        # the fast path: one new token per row of a float32 model on the CPU in inference (kernels.decode)
        fused = decode.prepare(self, tokens, pos2d, start, cache, rows) if prefix is None else None
        if fused is not None:
            return decode.forward(self, tokens, fused)

        x = self.tok_emb(tokens)
        if prefix is not None:
            if prefix.dim() != 3 or prefix.shape[0] != B or prefix.shape[1] > T or prefix.shape[2] != x.shape[2]:
                raise ValueError(f"prefix must be [{B}, P <= {T}, {x.shape[2]}], got {list(prefix.shape)}")
            x = torch.cat((prefix.to(x.dtype), x[:, prefix.shape[1]:]), 1)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.pos_emb(pos.clamp(min=0))
        else:
            angles = pos.clamp(min=0).unsqueeze(-1).float() * self.inv_freq  # [B, T, D/2]
            angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [B, T, 1, D]
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        step = Step(input_pos, rope, self._mask(pos2d, start, kv_len), cache, rows, kv_len)
        for i, block in enumerate(self.blocks):
            x = block(x, i, step)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:  # [B] one position per row (ragged prompts): logits [B, 1, V]
            x = x[torch.arange(B), logits_at].unsqueeze(1)
        elif logits_from:  # positions logits_from.. only (training on a prefix's continuation): [B, T - from, V]
            x = x[:, logits_from:]
        return self.lm_head(self.norm(x))

    @staticmethod
    def _mask(pos2d: Tensor, start: Tensor | None, kv_len: int) -> Tensor | None:
        """Boolean [B, 1, T, S] mask: slot s is visible to a query at slot q iff start <= s <= q."""
        B, T = pos2d.shape
        if T == 1 and (start is None or not bool(start.any())) and bool((pos2d == kv_len - 1).all()):
            return None  # one new token per row, all rows at the end: everything before is visible
        slots = torch.arange(kv_len, device=pos2d.device)
        allowed = slots[None, None, :] <= pos2d[:, :, None]
        if start is not None:
            allowed = allowed & (slots[None, None, :] >= start[:, None, None])
            # padding queries (before their row's start) see only themselves, so no row is fully masked (NaN)
            allowed = allowed | (slots[None, None, :] == pos2d[:, :, None])
        return allowed.unsqueeze(1)
