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
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigckit.text import decode_kernels, fastpath
from aigckit.text.config import LMConfig
from aigckit.text.kvcache import KVCache


class _FusedDecode:
    """What the fused decode kernels need, worked out once per forward (see ``decode_kernels``): each row's cache
    slot and first valid slot, RoPE cos/sin [B, D], and the calling thread's workspace, which holds all of it."""

    __slots__ = ("pos", "lo", "cos", "sin", "has_rope", "ws")

    def __init__(self, pos, lo, cos, sin, has_rope: bool, ws) -> None:
        self.pos, self.lo, self.cos, self.sin, self.has_rope, self.ws = pos, lo, cos, sin, has_rope, ws

    @staticmethod
    def caches(cache: KVCache, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s key and value caches as numpy arrays (views made once per cache)."""
        return cache.numpy_views()[layer]

    @classmethod
    def make(cls, model: Transformer, tokens: Tensor, pos2d: Tensor, start: Tensor | None, cache: KVCache | None,
             rows: Tensor | None) -> _FusedDecode | None:
        if (cache is None or rows is not None or pos2d.shape[1] != 1 or model.tok_emb.weight.dtype != torch.float32
                or cache.k[0].dtype != torch.float32 or not _use_kernels(tokens)):
            return None
        B = tokens.shape[0]
        ws = model.workspace()
        pos, lo = ws.get("pos", (B,), np.int64), ws.get("lo", (B,), np.int64)
        np.copyto(pos, pos2d[:, 0].numpy())
        if start is None:
            lo.fill(0)
        else:
            np.copyto(lo, start.numpy())
        if (pos < lo).any():  # a padding query: leave it to the masked reference path
            return None
        if model.config.arch != "llama":  # GPT-2: the kernels take (unused) arrays of the right type
            cos = sin = ws.get("cos", (B, 1))
            return cls(pos, lo, cos, sin, False, ws)
        # RoPE tables with the reference path's float32 ops (bit-equal): (pos - lo) * inv_freq, cos/sin, both halves
        half = model.inv_freq.shape[0]
        rel, ang, t = (torch.from_numpy(ws.get(n, (B, w))) for n, w in (("rel", 1), ("ang", half), ("trig", half)))
        torch.sub(pos2d, start[:, None], out=rel) if start is not None else rel.copy_(pos2d)
        torch.mul(rel, model.inv_freq, out=ang)
        cos, sin = ws.get("cos", (B, 2 * half)), ws.get("sin", (B, 2 * half))
        for fn, dst in ((torch.cos, cos), (torch.sin, sin)):
            fn(ang, out=t)
            tn = t.numpy()
            dst[:, :half] = tn
            dst[:, half:] = tn
        return cls(pos, lo, cos, sin, True, ws)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if _use_kernels(x) and x.is_contiguous():
                return decode_kernels.rms_norm(x, self.weight, self.eps)  # one numba call (inference only)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()  # lower precision: normalise in float32 like transformers, then cast back
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LMConfig) -> Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
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


def _use_kernels(x: Tensor) -> bool:
    """The fused numba kernels serve float32 CPU inference; autograd and other devices take the PyTorch ops."""
    return decode_kernels.AVAILABLE and x.device.type == "cpu" and not torch.is_grad_enabled()


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

    def forward(self, x: Tensor, layer: int, input_pos: Tensor, rope: tuple[Tensor, Tensor] | None,
                mask: Tensor | None, cache: KVCache | None, rows: Tensor | None, kv_len: int,
                fused: _FusedDecode | None = None) -> Tensor:
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        qkv = self.qkv(x)
        if fused is not None:  # one new token per row, float32 CPU: rope + cache write + attention in one call
            y = decode_kernels.attend_decode(qkv.reshape(B, -1).contiguous(), fused, cache.k[layer], cache.v[layer],
                                             nh, nkv)
            return self.proj(y.view(B, 1, nh * hd))
        if rope is not None:  # q and k are adjacent in the fused projection: rotate them in one go
            qk = apply_rope(qkv[..., :(nh + nkv) * hd].view(B, T, nh + nkv, hd), *rope)
            q, k = qk.split([nh, nkv], dim=2)
            v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd)
        else:
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if cache is not None:
            cache.write(layer, input_pos, k, v, rows)
            k, v = cache.read(layer, kv_len, rows, B)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)
        if T <= SMALL_T:
            y = grouped_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
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

    def forward(self, x: Tensor, layer: int, input_pos: Tensor, rope, mask, cache, rows, kv_len,
                fused: _FusedDecode | None = None) -> Tensor:
        if fused is not None:  # int8 / int4 / w8a8 / float32 Llama blocks: the whole block in a few fused calls
            plan = decode_kernels.block_plan(self)
            kind = plan.kind
            # float32 up to the rows where its tile kernel beats oneDNN (fastpath.SMALL_ROWS)
            if kind in ("int8", "int4") or (kind == "f32" and x.shape[0] <= fastpath.SMALL_ROWS):
                return decode_kernels.int8_block_step(self, x, layer, cache, fused, plan)
            if kind == "w8a8":
                return decode_kernels.w8a8_block_step(self, x, layer, cache, fused, plan)
        x = x + self.attn(self.attn_norm(x), layer, input_pos, rope, mask, cache, rows, kv_len, fused)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)
        self._workspaces: dict[int, decode_kernels.Workspace] = {}  # per thread, see workspace()

    def workspace(self) -> decode_kernels.Workspace:
        """The calling thread's scratch buffers for fused decode steps (``decode_kernels.Workspace``); threads that
        have ended leave theirs to be dropped the next time a thread takes a new one."""
        tid = threading.get_ident()
        ws = self._workspaces.get(tid)
        if ws is None:
            alive = {t.ident for t in threading.enumerate()}
            for dead in [t for t in self._workspaces if t not in alive]:
                self._workspaces.pop(dead, None)
            ws = self._workspaces[tid] = decode_kernels.Workspace()
        return ws

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) start with no scratch buffers
        state = self.__dict__.copy()
        state["_workspaces"] = {}
        return state

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
                logits_at: Tensor | None = None) -> Tensor:
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

        fused = _FusedDecode.make(self, tokens, pos2d, start, cache, rows)
        rope = None
        if fused is not None:  # one token per row: embeddings into the workspace (RoPE tables are in `fused`)
            x = torch.from_numpy(fused.ws.get("emb", (B, self.config.n_embd)))
            torch.index_select(self.tok_emb.weight, 0, tokens.view(-1), out=x)
            x = x.view(B, 1, -1)
        else:
            x = self.tok_emb(tokens)
        if self.config.arch == "gpt2":
            x = x + self.pos_emb(pos.clamp(min=0))
        elif fused is None:
            angles = pos.clamp(min=0).unsqueeze(-1).float() * self.inv_freq  # [B, T, D/2]
            angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [B, T, 1, D]
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        mask = None if fused is not None else self._mask(pos2d, start, kv_len)  # the fused kernel bounds rows itself
        for i, block in enumerate(self.blocks):
            x = block(x, i, input_pos, rope, mask, cache, rows, kv_len, fused)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:  # [B] one position per row (ragged prompts): logits [B, 1, V]
            x = x[torch.arange(B), logits_at].unsqueeze(1)
        if fused is not None and isinstance(self.norm, RMSNorm) and x.is_contiguous():
            x = decode_kernels.rms_norm(x, self.norm.weight, self.norm.eps, fused.ws.get("final", (B, x.shape[-1])))
            return self.lm_head(x)
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
