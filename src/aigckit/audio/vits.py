"""VITS text-to-speech inference (Kim et al. 2021, "Conditional Variational Autoencoder with Adversarial Learning for
End-to-End Text-to-Speech"), the variant Piper voices are trained with (jaywalnut310/vits, single speaker).

Reads top to bottom: config -> text encoder (relative-position self-attention) -> stochastic duration predictor
(a normalising flow over log-durations with rational-quadratic spline couplings, run in reverse from noise) ->
alignment (each phoneme's prior repeated for its ceil'd duration) -> residual coupling flow (reverse, prior -> z)
-> HiFi-GAN decoder (z -> 22 kHz waveform). Module and parameter names mirror the reference implementation so the
weight-name table in ``aigckit.audio.weights`` is short and readable.

Paper symbols: the text encoder gives the prior ``p(z_p | c) = N(m_p, exp(logs_p))`` per phoneme; the duration
predictor samples ``log w`` from noise ``u ~ N(0, 1) * noise_w``; ``z_p = m_p + eps * exp(logs_p) * noise_scale`` with
``eps ~ N(0, 1)``; the flow ``f^-1`` maps ``z_p`` to ``z``; the decoder ``G(z)`` is the waveform.

All randomness is explicit: ``infer(..., generator=g)`` draws both noises from ``g`` in a fixed order, or the caller
passes them (``noise_dp``, ``noise_z``), which is how the parity test feeds onnxruntime the very same noise.
No state is kept between calls: one model can serve concurrent requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from aigckit.errors import AigcError
from aigckit.layers import embedding

LRELU_SLOPE = 0.1  # HiFi-GAN's leaky-ReLU slope inside the generator (the very last one uses torch's 0.01)

# ------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VitsConfig:
    """Hyper-parameters of a single-speaker VITS generator (inference part only). The defaults are Piper's
    "medium" quality voices, e.g. en_US-joe-medium; ``aigckit.audio.weights.config_from_onnx`` reads them off a file."""

    n_vocab: int = 256  # phoneme-id vocabulary (Piper: 256 symbols)
    hidden_channels: int = 192  # text encoder width
    inter_channels: int = 192  # latent z channels
    filter_channels: int = 768  # text encoder FFN width
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3  # text encoder FFN conv kernel
    window_size: int = 4  # relative-position attention window (offsets -4..4)
    # stochastic duration predictor
    dp_filter_channels: int = 192
    dp_kernel_size: int = 3
    dp_n_flows: int = 4
    dp_num_bins: int = 10
    dp_tail_bound: float = 5.0
    # residual coupling flow (mean-only couplings with WaveNet-style conditioning nets)
    flow_n_flows: int = 4
    flow_hidden_channels: int = 192
    flow_kernel_size: int = 5
    flow_dilation_rate: int = 1
    flow_n_layers: int = 4
    # HiFi-GAN decoder
    upsample_initial_channel: int = 256
    upsample_rates: tuple[int, ...] = (8, 8, 4)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8)
    resblock: Literal["2"] = "2"  # HiFi-GAN ResBlock2: two dilated convs per block
    resblock_kernel_sizes: tuple[int, ...] = (3, 5, 7)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 2), (2, 6), (3, 12))
    sample_rate: int = 22050
    hop_length: int = field(init=False)  # waveform samples per latent frame (product of the upsample rates)

    def __post_init__(self) -> None:
        for f in ("n_vocab", "hidden_channels", "inter_channels", "filter_channels", "n_heads", "n_layers",
                  "kernel_size", "dp_filter_channels", "dp_kernel_size", "dp_n_flows", "dp_num_bins", "flow_n_flows",
                  "flow_hidden_channels", "flow_kernel_size", "flow_n_layers", "upsample_initial_channel",
                  "sample_rate"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AigcError(f"VITS config: {f} must be a positive integer, got {v!r}")
        if self.hidden_channels % self.n_heads:
            raise AigcError(f"VITS config: hidden_channels {self.hidden_channels} not divisible by "
                            f"n_heads {self.n_heads}")
        if self.inter_channels % 2:
            raise AigcError(f"VITS config: inter_channels must be even, got {self.inter_channels}")
        if self.resblock != "2":
            raise AigcError(f"VITS config: only HiFi-GAN resblock '2' is supported, got {self.resblock!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise AigcError("VITS config: upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise AigcError("VITS config: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            raise AigcError("VITS config: upsample_initial_channel too small for the number of upsamplings")
        object.__setattr__(self, "hop_length", math.prod(self.upsample_rates))

    @property
    def k_channels(self) -> int:
        return self.hidden_channels // self.n_heads


# ------------------------------------------------------------------------------------------------------ helpers


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[b] lengths -> [b, max_len] bool mask, True where position < length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class LayerNorm(nn.Module):
    """Layer norm over the channel axis of a [b, c, t] tensor (VITS' channels-first LayerNorm)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.transpose(1, -1), (x.shape[1],), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


# ------------------------------------------------------------------------------------------------- text encoder


class MultiHeadAttention(nn.Module):
    """Self-attention with relative-position keys and values (Shaw et al. 2018) over a window of +-window_size,
    embeddings shared across heads. Offsets outside the window contribute nothing (their embeddings are zero)."""

    def __init__(self, channels: int, n_heads: int, window_size: int):
        super().__init__()
        self.n_heads, self.k_channels, self.window_size = n_heads, channels // n_heads, window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        n_rel = 2 * window_size + 1
        self.emb_rel_k = nn.Parameter(torch.zeros(1, n_rel, self.k_channels))  # offset j - i = -w..w
        self.emb_rel_v = nn.Parameter(torch.zeros(1, n_rel, self.k_channels))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        h, d, w = self.n_heads, self.k_channels, self.window_size
        q = self.conv_q(x).view(b, h, d, t).transpose(2, 3) / math.sqrt(d)  # [b, h, t, d]
        k = self.conv_k(x).view(b, h, d, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, d, t).transpose(2, 3)
        # offset[i, j] = j - i; within the window it indexes the relative embeddings at offset + w
        pos = torch.arange(t, device=x.device)
        offset = pos[None, :] - pos[:, None]
        in_window = offset.abs() <= w  # [t, t]
        rel_index = (offset + w).clamp(0, 2 * w)
        # scores_ij = q_i . k_j + q_i . e^K_{j-i}
        rel_logits = q @ self.emb_rel_k[0].T  # [b, h, t, 2w+1]: q_i . e^K_r for every offset r
        scores_rel = rel_logits.gather(-1, rel_index.expand(b, h, t, t)) * in_window
        scores = q @ k.transpose(-2, -1) + scores_rel
        scores = scores.masked_fill(~attn_mask, -1e4)
        p = F.softmax(scores, dim=-1)
        # out_i = sum_j p_ij v_j + sum_j p_ij e^V_{j-i}: fold p over each offset r, then mix the value embeddings
        p_rel = torch.zeros(b, h, t, 2 * w + 1, dtype=p.dtype, device=p.device)
        p_rel.scatter_add_(-1, rel_index.expand(b, h, t, t), p * in_window)
        out = p @ v + p_rel @ self.emb_rel_v[0]  # [b, h, t, d]
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class FFN(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding=pad)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_1(x * x_mask))
        return self.conv_2(x * x_mask) * x_mask


class Encoder(nn.Module):
    """Post-norm transformer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        c = cfg.hidden_channels
        self.attn_layers = nn.ModuleList(MultiHeadAttention(c, cfg.n_heads, cfg.window_size)
                                         for _ in range(cfg.n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(c) for _ in range(cfg.n_layers))
        self.ffn_layers = nn.ModuleList(FFN(c, cfg.filter_channels, cfg.kernel_size) for _ in range(cfg.n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(c) for _ in range(cfg.n_layers))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        attn_mask = x_mask[:, :, :, None] & x_mask[:, :, None, :]  # [b, 1, t, t]
        xm = x_mask.to(x.dtype)
        x = x * xm
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm1(x + attn(x, attn_mask))
            x = norm2(x + ffn(x, xm))
        return x * xm


class TextEncoder(nn.Module):
    """Phoneme ids -> hidden states x and the prior's mean m_p and log-std logs_p, per phoneme."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.hidden_channels = cfg.hidden_channels
        self.emb = embedding(cfg.n_vocab, cfg.hidden_channels)
        self.encoder = Encoder(cfg)
        self.proj = nn.Conv1d(cfg.hidden_channels, 2 * cfg.inter_channels, 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        x = self.emb(ids) * math.sqrt(self.hidden_channels)  # [b, t, c]
        x = x.transpose(1, 2)
        x_mask = sequence_mask(lengths, ids.shape[1])[:, None, :]  # [b, 1, t] bool
        x = self.encoder(x, x_mask)
        stats = self.proj(x) * x_mask
        m_p, logs_p = stats.chunk(2, dim=1)
        return x, m_p, logs_p, x_mask


# ------------------------------------------------------------------------------ stochastic duration predictor


class DDSConv(nn.Module):
    """Dilated depth-separable convolutions (dilation kernel_size**i), each then LN-GELU-1x1-LN-GELU, residual."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int):
        super().__init__()
        self.convs_sep = nn.ModuleList()
        self.convs_1x1 = nn.ModuleList()
        self.norms_1 = nn.ModuleList()
        self.norms_2 = nn.ModuleList()
        for i in range(n_layers):
            dilation = kernel_size**i
            self.convs_sep.append(nn.Conv1d(channels, channels, kernel_size, groups=channels, dilation=dilation,
                                            padding=(kernel_size * dilation - dilation) // 2))
            self.convs_1x1.append(nn.Conv1d(channels, channels, 1))
            self.norms_1.append(LayerNorm(channels))
            self.norms_2.append(LayerNorm(channels))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        if g is not None:
            x = x + g
        for sep, n1, c11, n2 in zip(self.convs_sep, self.norms_1, self.convs_1x1, self.norms_2):
            y = F.gelu(n1(sep(x * x_mask)))
            y = F.gelu(n2(c11(y)))
            x = x + y
        return x * x_mask


def rational_quadratic_spline_inverse(y: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor,
                                      derivatives: torch.Tensor, *, tail_bound: float, min_bin_width: float = 1e-3,
                                      min_bin_height: float = 1e-3, min_derivative: float = 1e-3) -> torch.Tensor:
    """Inverse of the monotonic rational-quadratic spline (Durkan et al. 2019) on [-B, B], identity outside.

    ``widths``/``heights`` [..., K] and ``derivatives`` [..., K-1] are unnormalised; y is [...]. With linear tails the
    boundary derivatives are 1 so the spline joins the identity smoothly. Returns x with spline(x) = y.
    """
    B, K = tail_bound, widths.shape[-1]
    inside = (y >= -B) & (y <= B)
    yc = y.clamp(-B, B)  # evaluate everywhere, keep the result only inside

    def knots(unnorm: torch.Tensor, min_bin: float) -> tuple[torch.Tensor, torch.Tensor]:
        size = min_bin + (1 - min_bin * K) * F.softmax(unnorm, dim=-1)
        cum = F.pad(torch.cumsum(size, dim=-1), (1, 0))
        cum = 2 * B * cum - B
        cum = torch.cat([torch.full_like(cum[..., :1], -B), cum[..., 1:-1], torch.full_like(cum[..., :1], B)], -1)
        return cum, cum[..., 1:] - cum[..., :-1]

    cumwidths, w = knots(widths, min_bin_width)
    cumheights, h = knots(heights, min_bin_height)
    edge = math.log(math.exp(1 - min_derivative) - 1)  # softplus(edge) + min_derivative == 1
    d = F.pad(derivatives, (1, 1), value=edge)
    d = min_derivative + F.softplus(d)  # [..., K+1] derivatives at the knots

    # the bin k holding y: cumheights[k] <= y < cumheights[k+1] (the top knot nudged up so y == B falls in bin K-1)
    locs = torch.cat([cumheights[..., :-1], cumheights[..., -1:] + 1e-6], dim=-1)
    k = (yc[..., None] >= locs).sum(-1, keepdim=True) - 1

    def at(t: torch.Tensor) -> torch.Tensor:
        return t.gather(-1, k)[..., 0]

    x_k, w_k, y_k, h_k = at(cumwidths), at(w), at(cumheights), at(h)
    s_k = h_k / w_k  # bin slope
    d_k, d_k1 = at(d), d[..., 1:].gather(-1, k)[..., 0]
    # solve a*xi^2 + b*xi + c = 0 for the position xi in [0, 1] inside the bin
    dy = yc - y_k
    a = dy * (d_k + d_k1 - 2 * s_k) + h_k * (s_k - d_k)
    b = h_k * d_k - dy * (d_k + d_k1 - 2 * s_k)
    c = -s_k * dy
    disc = (b * b - 4 * a * c).clamp_min(0)
    xi = (2 * c) / (-b - torch.sqrt(disc))
    return torch.where(inside, xi * w_k + x_k, y)


class ElementwiseAffine(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return (x - self.m) * torch.exp(-self.logs) * x_mask


class Flip(nn.Module):
    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return torch.flip(x, [1])


class ConvFlow(nn.Module):
    """Coupling layer: x1 -> spline(x1; params from x0 and the text condition g)."""

    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int, n_layers: int, num_bins: int,
                 tail_bound: float):
        super().__init__()
        self.half, self.filter_channels = in_channels // 2, filter_channels
        self.num_bins, self.tail_bound = num_bins, tail_bound
        self.pre = nn.Conv1d(self.half, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel_size, n_layers)
        self.proj = nn.Conv1d(filter_channels, self.half * (num_bins * 3 - 1), 1)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        x0, x1 = x.split(self.half, dim=1)
        h = self.proj(self.convs(self.pre(x0), x_mask, g=g)) * x_mask
        b, c, t = x0.shape
        h = h.reshape(b, c, -1, t).permute(0, 1, 3, 2)  # [b, c, t, 3K-1]
        K, scale = self.num_bins, math.sqrt(self.filter_channels)
        x1 = rational_quadratic_spline_inverse(x1, h[..., :K] / scale, h[..., K:2 * K] / scale, h[..., 2 * K:],
                                               tail_bound=self.tail_bound)
        return torch.cat([x0, x1], dim=1) * x_mask


class StochasticDurationPredictor(nn.Module):
    """Flow over (log w, aux) conditioned on the text hidden states; at inference run in reverse from noise.

    ``flows`` keeps the training-time layout [affine, (convflow, flip) x n]; reverse inference walks it backwards and
    skips the first ConvFlow (index 1), which in VITS only ever touches the auxiliary channel ("useless vflow").
    """

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        fc = cfg.dp_filter_channels
        self.pre = nn.Conv1d(cfg.hidden_channels, fc, 1)
        self.convs = DDSConv(fc, cfg.dp_kernel_size, n_layers=3)
        self.proj = nn.Conv1d(fc, fc, 1)
        flows: list[nn.Module] = [ElementwiseAffine(2)]
        for i in range(cfg.dp_n_flows):
            # flows[1] only matters for training, and inference exports (Piper's ONNX) do not carry its weights
            flow = (nn.Identity() if i == 0
                    else ConvFlow(2, fc, cfg.dp_kernel_size, 3, cfg.dp_num_bins, cfg.dp_tail_bound))
            flows += [flow, Flip()]
        self.flows = nn.ModuleList(flows)

    @property
    def reverse_flows(self) -> list[nn.Module]:
        rev = list(reversed(self.flows))
        return rev[:-2] + [rev[-1]]

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x: text hidden states [b, c, t]; noise: [b, 2, t] already scaled by noise_w. Returns log w [b, 1, t]."""
        x = self.proj(self.convs(self.pre(x), x_mask)) * x_mask
        z = noise
        for flow in self.reverse_flows:
            z = flow.reverse(z, x_mask, g=x)
        return z[:, :1]


# ----------------------------------------------------------------------------------------------- coupling flow


class WN(nn.Module):
    """WaveNet-like stack of gated dilated convolutions (no global conditioning: single speaker)."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int):
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate**i
            self.in_layers.append(nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dilation,
                                            padding=(kernel_size * dilation - dilation) // 2))
            self.res_skip_layers.append(nn.Conv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for i, (inl, rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = inl(x)
            acts = torch.tanh(a[:, :self.hidden]) * torch.sigmoid(a[:, self.hidden:])
            r = rs(acts)
            if i < self.n_layers - 1:
                x = (x + r[:, :self.hidden]) * x_mask
                out = out + r[:, self.hidden:]
            else:
                out = out + r
        return out * x_mask


class ResidualCouplingLayer(nn.Module):
    """Mean-only affine coupling: x1 <- x1 + m(x0) (forward), x1 <- x1 - m(x0) (reverse)."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, kernel_size, dilation_rate, n_layers)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x0, x1 = x.split(self.half, dim=1)
        h = self.enc(self.pre(x0) * x_mask, x_mask)
        m = self.post(h) * x_mask
        return torch.cat([x0, (x1 - m) * x_mask], dim=1)


class ResidualCouplingBlock(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        flows: list[nn.Module] = []
        for _ in range(cfg.flow_n_flows):
            flows += [ResidualCouplingLayer(cfg.inter_channels, cfg.flow_hidden_channels, cfg.flow_kernel_size,
                                            cfg.flow_dilation_rate, cfg.flow_n_layers), Flip()]
        self.flows = nn.ModuleList(flows)

    def reverse(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        for flow in reversed(self.flows):
            x = flow.reverse(x, x_mask) if isinstance(flow, ResidualCouplingLayer) else torch.flip(x, [1])
        return x


# ------------------------------------------------------------------------------------------- HiFi-GAN decoder
#
# Speed: the decoder is most of the compute (about 4 GFLOP per second of audio), in convolutions with few channels
# (128 -> 32) over long sequences. oneDNN runs those 2-4x faster in channels-last (NWC) layout than in PyTorch's
# default NCW, so the decoder keeps its activations as [b, c, 1, t] channels-last tensors and calls conv2d with the
# Conv1d weights viewed as [o, i, 1, k]. The parameters stay the Conv1d ones of the reference (same names and shapes).


def _to_nwc(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def _conv_nwc(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` applied to a [b, c, 1, t] channels-last tensor (same result as conv(x[:, :, 0]))."""
    return F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                    dilation=(1, conv.dilation[0]))


def _conv_transpose_nwc(x: torch.Tensor, up: nn.ConvTranspose1d) -> torch.Tensor:
    return F.conv_transpose2d(x, up.weight.unsqueeze(2), up.bias, stride=(1, up.stride[0]), padding=(0, up.padding[0]))


def _zero_tail(x: torch.Tensor, lengths: list[int] | None, scale: int) -> torch.Tensor:
    """Zero each item's positions >= length * scale (in place), so a padded batch or a fixed-size window computes
    exactly what the unpadded sequence would: every conv then sees zeros past the end, as its zero padding would."""
    if lengths is not None:
        for b, n in enumerate(lengths):
            if n * scale < x.shape[-1]:
                x[b, ..., n * scale:].zero_()
    return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations)

    def forward(self, x: torch.Tensor, x_act: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """x: [b, c, 1, t] channels-last, zero past ``lengths``; ``x_act`` = leaky_relu(x), shared by all blocks of a
        stage. Returns x + the block's residuals (the caller zeroes the tail of the sum)."""
        for i, conv in enumerate(self.convs):
            xt = x_act if i == 0 else _zero_tail(F.leaky_relu(x, LRELU_SLOPE), lengths, 1)
            x = _conv_nwc(xt, conv).add_(x)
        return x


class Generator(nn.Module):
    """HiFi-GAN: conv -> (leaky-ReLU, transposed-conv upsampling, mean of multi-receptive-field res blocks) per stage
    -> leaky-ReLU -> conv -> tanh."""

    def __init__(self, cfg: VitsConfig):
        super().__init__()
        ch = cfg.upsample_initial_channel
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(cfg.inter_channels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            c_in, c_out = ch >> i, ch >> (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2))
            for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock2(c_out, rk, tuple(rd)))
        self.conv_post = nn.Conv1d(ch >> len(cfg.upsample_rates), 1, 7, padding=3, bias=False)

    def forward(self, z: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """z [b, inter_channels, t] -> waveform [b, 1, t * hop]. With ``lengths`` (frames per item, z zero past
        them) the samples before length * hop are exactly those of the unpadded item; the rest is to be discarded."""
        x = _zero_tail(_conv_nwc(_to_nwc(z), self.conv_pre), lengths, 1)
        nk, scale = self.num_kernels, 1
        for i, up in enumerate(self.ups):
            scale *= up.stride[0]
            x = _zero_tail(_conv_transpose_nwc(F.leaky_relu(x, LRELU_SLOPE), up), lengths, scale)
            x_act = F.leaky_relu(x, LRELU_SLOPE)
            rb = [self.resblocks[i * nk + j] for j in range(nk)]
            lens = None if lengths is None else [n * scale for n in lengths]
            xs = rb[0](x, x_act, lens)
            for block in rb[1:]:
                xs.add_(block(x, x_act, lens))
            x = _zero_tail(xs.div_(nk), lengths, scale)
        x = _conv_nwc(F.leaky_relu(x), self.conv_post)  # torch's default slope 0.01 here, as in the reference
        return torch.tanh(x[:, :, 0])

    def receptive_field(self) -> int:
        """How many latent frames on each side can influence one output sample (a safe upper bound): decoding a
        window with this much context on both sides of the kept part gives the same samples as decoding it all."""
        reach = (self.conv_pre.kernel_size[0] - 1) // 2  # in frames
        scale = 1
        for i, up in enumerate(self.ups):
            reach += math.ceil(up.kernel_size[0] / up.stride[0]) / scale  # a transposed conv sees ~k/u inputs
            scale *= up.stride[0]
            nk = self.num_kernels
            block_reach = max(sum((c.kernel_size[0] - 1) // 2 * c.dilation[0] for c in self.resblocks[i * nk + j].convs)
                              for j in range(nk))
            reach += block_reach / scale
        reach += (self.conv_post.kernel_size[0] - 1) // 2 / scale
        return math.ceil(reach)


# ------------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Alignment:
    """What the duration predictor decided for one utterance: frames per phoneme (after ceil and length_scale)."""

    durations: torch.Tensor  # [b, t_x] int64
    frame_lengths: torch.Tensor  # [b] int64


class VitsModel(nn.Module):
    def __init__(self, cfg: VitsConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_p = TextEncoder(cfg)
        self.dp = StochasticDurationPredictor(cfg)
        self.flow = ResidualCouplingBlock(cfg)
        self.dec = Generator(cfg)

    # The three stages are public so the streaming code and the tests can run them separately.

    def durations(self, ids: torch.Tensor, lengths: torch.Tensor, *, length_scale: float, noise_dp: torch.Tensor):
        """Text -> (prior stats, alignment). ``noise_dp`` [b, 2, t_x] is N(0,1) noise already times noise_w."""
        x, m_p, logs_p, x_mask = self.enc_p(ids, lengths)
        xm = x_mask.to(x.dtype)
        logw = self.dp.reverse(x, xm, noise_dp)
        w_ceil = torch.ceil(torch.exp(logw) * xm * length_scale)[:, 0]  # [b, t_x] frames per phoneme
        frame_lengths = w_ceil.sum(-1).clamp_min(1).long()
        return m_p, logs_p, Alignment(w_ceil.long(), frame_lengths)

    @staticmethod
    def expand(stats: torch.Tensor, align: Alignment, t_y: int) -> torch.Tensor:
        """Repeat each phoneme's prior statistics [b, c, t_x] for its frames -> [b, c, t_y] (zero past the end)."""
        ends = align.durations.cumsum(-1)  # phoneme i covers frames [ends_i - d_i, ends_i)
        frames = torch.arange(t_y, device=stats.device)[None, :, None]
        path = (frames < ends[:, None, :]) & (frames >= (ends - align.durations)[:, None, :])  # [b, t_y, t_x]
        return stats @ path.transpose(1, 2).to(stats.dtype)

    def latents(self, m_p: torch.Tensor, logs_p: torch.Tensor, align: Alignment, *, noise_z: torch.Tensor):
        """Frame-level prior sample z_p -> z through the reversed flow. ``noise_z`` [b, c, t_y] is N(0,1) noise
        already times noise_scale, t_y >= every frame length (a longer t_y pads; the flow masks every conv input, so
        padding changes nothing). Returns z [b, inter_channels, t_y], zero beyond each frame length."""
        t_y = noise_z.shape[2]
        y_mask = sequence_mask(align.frame_lengths, t_y)[:, None, :].to(m_p.dtype)
        z_p = self.expand(m_p, align, t_y) + noise_z * torch.exp(self.expand(logs_p, align, t_y))
        return self.flow.reverse(z_p, y_mask) * y_mask

    @torch.inference_mode()
    def infer(self, ids: torch.Tensor, lengths: torch.Tensor | None = None, *, noise_scale: float = 0.667,
              length_scale: float = 1.0, noise_w: float = 0.8, generator: torch.Generator | None = None,
              noise_dp: torch.Tensor | None = None,
              noise_z: Callable[[tuple[int, ...]], torch.Tensor] | torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, Alignment]:
        """Phoneme ids [b, t_x] -> waveform [b, t_y * hop] in [-1, 1] and the alignment.

        Noise: unscaled standard-normal tensors ``noise_dp`` [b, 2, t_x] and ``noise_z`` [b, inter_channels, t_y]
        (a tensor, or a function of the shape since t_y is only known after the durations), else both drawn from
        ``generator`` (dp first, then z). They are multiplied by noise_w and noise_scale here.
        """
        if ids.dim() != 2:
            raise AigcError(f"ids must be [batch, phonemes], got shape {tuple(ids.shape)}")
        if lengths is None:
            lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
        dtype = self.dec.conv_pre.weight.dtype
        b, t_x = ids.shape
        if noise_dp is None:
            noise_dp = torch.randn(b, 2, t_x, generator=generator, dtype=dtype)
        m_p, logs_p, align = self.durations(ids, lengths, length_scale=length_scale,
                                            noise_dp=noise_dp.to(dtype) * noise_w)
        shape = (b, self.cfg.inter_channels, int(align.frame_lengths.max()))
        if noise_z is None:
            noise_z = torch.randn(shape, generator=generator, dtype=dtype)
        elif callable(noise_z):
            noise_z = noise_z(shape)
        if tuple(noise_z.shape) != shape:
            raise AigcError(f"noise_z must have shape {shape}, got {tuple(noise_z.shape)}")
        z = self.latents(m_p, logs_p, align, noise_z=noise_z.to(dtype) * noise_scale)
        n_frames = align.frame_lengths.tolist()
        audio = self.dec(z, n_frames if b > 1 else None)[:, 0]
        return _zero_tail(audio, n_frames, self.cfg.hop_length), align
