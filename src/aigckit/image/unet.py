"""A small UNet for diffusion: timestep embedding, residual blocks, self-attention at low resolution.

Reads top to bottom: config -> building blocks -> model. ``forward(x_t, t, labels) -> prediction`` (ε or v, same shape
as ``x_t``). Class conditioning adds a label embedding to the timestep embedding; label ``num_classes`` is the
"no label" token used for classifier-free guidance.

Text conditioning (``context_dim > 0``, Stable Diffusion's recipe in miniature): ``forward(x_t, t, text=TextCondition)``
where the frozen text encoder's token states are attended to by cross-attention blocks (at ``cross_levels`` and in the
middle) and its pooled sentence vector is added to the timestep embedding (the FiLM path of every ResBlock).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError


@dataclass
class UNetConfig:
    resolution: int = 28
    channels: int = 1  # image channels
    base: int = 64  # channels at full resolution
    mults: tuple[int, ...] = (1, 2, 2)  # channel multiplier per level; each level after the first halves the size
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (2,)  # which levels (0 = full resolution) get self-attention
    num_classes: int = 0  # 0: unconditional
    dropout: float = 0.0
    groups: int = 8  # GroupNorm groups
    context_dim: int = 0  # 0: no text; else the text encoder's token-state width (384 for MiniLM)
    cross_levels: tuple[int, ...] = ()  # levels whose blocks get cross-attention to the text tokens (and the middle)
    heads: int = 4  # cross-attention heads

    def __post_init__(self) -> None:
        self.mults = tuple(int(m) for m in self.mults)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        self.cross_levels = tuple(int(a) for a in self.cross_levels)
        if self.context_dim < 0:
            raise AigcError(f"context_dim must be >= 0, got {self.context_dim}")
        if self.context_dim:
            for m in self.mults:
                if (self.base * m) % self.heads:
                    raise AigcError(f"channels {self.base * m} not divisible by {self.heads} cross-attention heads")
        if self.resolution % (2 ** (len(self.mults) - 1)):
            raise AigcError(f"resolution {self.resolution} is not divisible by 2^{len(self.mults) - 1} "
                            f"(UNet with {len(self.mults)} levels)")
        for m in self.mults:
            if (self.base * m) % self.groups:
                raise AigcError(f"channels {self.base * m} not divisible by {self.groups} GroupNorm groups")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer / DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each B x HW x C
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


@dataclass(frozen=True)
class TextCondition:
    """A batch of encoded prompts, a value passed through sampling: token states B x L x D, key mask B x L (True =
    a real token), pooled sentence vectors B x D."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "TextCondition":
        return TextCondition(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def repeat(self, n: int) -> "TextCondition":
        """Each row n times in a row: prompts [a, b] -> [a]*n + [b]*n."""
        return TextCondition(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0),
                             self.pooled.repeat_interleave(n, 0))

    @staticmethod
    def cat(parts: list["TextCondition"]) -> "TextCondition":
        """Rows of several conditions, token states right-padded (mask False) to the longest."""
        L = max(p.tokens.shape[1] for p in parts)  # noqa: N806

        def pad(x: torch.Tensor, value) -> torch.Tensor:
            extra = L - x.shape[1]
            if not extra:
                return x
            return torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), value)], 1)

        return TextCondition(torch.cat([pad(p.tokens.float(), 0.0) for p in parts]),
                             torch.cat([pad(p.mask.bool(), False) for p in parts]),
                             torch.cat([p.pooled.float() for p in parts]))


class CrossAttention(nn.Module):
    """Multi-head attention from the H*W positions (queries) to the text tokens (keys/values), residual; the output
    projection starts at zero so a fresh block is the identity."""

    def __init__(self, ch: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.ctx_norm = nn.LayerNorm(context_dim)
        self.q = nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, text: TextCondition) -> torch.Tensor:
        b, c, h, w = x.shape
        nh = self.heads
        q = self.q(self.norm(x)).reshape(b, nh, c // nh, h * w).transpose(-1, -2)  # B x nh x HW x c/nh
        k, v = self.kv(self.ctx_norm(text.tokens.to(x.dtype))).chunk(2, dim=-1)  # B x L x C each
        k = k.reshape(b, -1, nh, c // nh).transpose(1, 2)
        v = v.reshape(b, -1, nh, c // nh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text.mask.bool()[:, None, None, :])
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.text_emb = (nn.Sequential(nn.Linear(cfg.context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                         if cfg.context_dim else None)  # pooled sentence vector -> timestep embedding
        self.conv_in = nn.Conv2d(cfg.channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, m in enumerate(cfg.mults):
            for _ in range(cfg.num_res_blocks):
                blk = nn.ModuleDict({"res": ResBlock(cur, ch * m, emb_dim, cfg.groups, cfg.dropout)})
                cur = ch * m
                if level in cfg.attn_levels:
                    blk["attn"] = Attention(cur, cfg.groups)
                if cfg.context_dim and level in cfg.cross_levels:
                    blk["xattn"] = CrossAttention(cur, cfg.context_dim, cfg.heads, cfg.groups)
                self.down.append(blk)
                skips.append(cur)
            if level < len(cfg.mults) - 1:
                self.down.append(nn.ModuleDict({"downsample": nn.Conv2d(cur, cur, 3, stride=2, padding=1)}))
                skips.append(cur)

        self.mid1 = ResBlock(cur, cur, emb_dim, cfg.groups, cfg.dropout)
        self.mid_attn = Attention(cur, cfg.groups)
        if cfg.context_dim:
            self.mid_xattn = CrossAttention(cur, cfg.context_dim, cfg.heads, cfg.groups)
        self.mid2 = ResBlock(cur, cur, emb_dim, cfg.groups, cfg.dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.mults))):
            m = cfg.mults[level]
            for _ in range(cfg.num_res_blocks + 1):
                blk = nn.ModuleDict({"res": ResBlock(cur + skips.pop(), ch * m, emb_dim, cfg.groups, cfg.dropout)})
                cur = ch * m
                if level in cfg.attn_levels:
                    blk["attn"] = Attention(cur, cfg.groups)
                if cfg.context_dim and level in cfg.cross_levels:
                    blk["xattn"] = CrossAttention(cur, cfg.context_dim, cfg.heads, cfg.groups)
                self.up.append(blk)
            if level > 0:
                self.up.append(nn.ModuleDict({"upsample": nn.Conv2d(cur, cur, 3, padding=1)}))

        self.norm_out = nn.GroupNorm(cfg.groups, cur)
        self.conv_out = nn.Conv2d(cur, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: TextCondition | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base))
        if self.text_emb is not None:
            if text is None:
                raise AigcError("this UNet is text-conditioned: pass text= (the empty prompt for unconditional)")
            emb = emb + self.text_emb(text.pooled.to(emb.dtype))
        elif text is not None:
            raise AigcError("this UNet is not text-conditioned; it cannot take a prompt")
        if self.label_emb is not None:
            if labels is None:  # unconditional request on a conditional model: the "no label" token
                labels = torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels)
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            if "downsample" in blk:
                h = blk["downsample"](h)
            else:
                h = blk["res"](h, emb)
                if "attn" in blk:
                    h = blk["attn"](h)
                if "xattn" in blk:
                    h = blk["xattn"](h, text)
            hs.append(h)
        h = self.mid_attn(self.mid1(h, emb))
        if self.text_emb is not None:
            h = self.mid_xattn(h, text)
        h = self.mid2(h, emb)
        for blk in self.up:
            if "upsample" in blk:
                h = blk["upsample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = blk["res"](torch.cat([h, hs.pop()], dim=1), emb)
                if "attn" in blk:
                    h = blk["attn"](h)
                if "xattn" in blk:
                    h = blk["xattn"](h, text)
        return self.conv_out(F.silu(self.norm_out(h)))
