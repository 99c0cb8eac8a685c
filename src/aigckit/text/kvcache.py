"""Preallocated key/value cache, indexed by slot position.

Layout per layer: ``[batch, n_kv_head, max_len, head_dim]`` so attention reads a contiguous prefix. Each batch row is
an independent *slot*: rows may sit at different positions (ragged batches, requests joining and leaving between
decode steps), which is why writes take per-row positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layer: int, batch: int, max_len: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch, self.max_len = batch, max_len

    def numpy_views(self) -> list[tuple]:
        """Per layer (keys, values) as numpy arrays sharing the cache's memory (CPU), made once: the fused decode
        kernels read and write them every step."""
        views = self.__dict__.get("_np")
        if views is None:
            views = self.__dict__["_np"] = [(k.numpy(), v.numpy()) for k, v in zip(self.k, self.v)]
        return views

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> KVCache:
        return cls(cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim, dtype)

    def write(self, layer: int, input_pos: Tensor | slice, k: Tensor, v: Tensor, rows: Tensor | None = None) -> None:
        """Store ``k, v`` ([B, T, H, D]) at ``input_pos`` ([T] contiguous range shared by all rows, or [B, T]).

        ``rows`` maps the B batch rows onto cache rows (default: rows 0..B-1)."""
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(input_pos, slice):  # shared contiguous positions, already resolved by the caller
            B = k.shape[0]
            kc[:B, :, input_pos] = k.transpose(1, 2)
            vc[:B, :, input_pos] = v.transpose(1, 2)
            return
        if rows is None and input_pos.dim() == 1:  # shared positions: a contiguous range -> slice copy
            B, T = k.shape[:2]
            p0 = int(input_pos[0])
            kc[:B, :, p0:p0 + T] = k.transpose(1, 2)
            vc[:B, :, p0:p0 + T] = v.transpose(1, 2)
            return
        B, T = k.shape[:2]
        if rows is None:
            rows = torch.arange(B, device=k.device)
        pos = input_pos if input_pos.dim() == 2 else input_pos.expand(B, T)
        r = rows[:, None].expand(B, T)
        kc[r, :, pos] = k.to(kc.dtype)  # advanced indices -> value shape [B, T, H, D]
        vc[r, :, pos] = v.to(vc.dtype)

    def read(self, layer: int, length: int, rows: Tensor | None = None, batch: int | None = None
             ) -> tuple[Tensor, Tensor]:
        """Keys and values of the first ``length`` slots: [B, H, length, D] (rows 0..batch-1 by default)."""
        kc, vc = self.k[layer], self.v[layer]
        if rows is None:
            b = kc.shape[0] if batch is None else batch
            return kc[:b, :, :length], vc[:b, :, :length]
        return kc[rows, :, :length], vc[rows, :, :length]

    def reorder(self, index: Tensor, length: int | None = None) -> None:
        """Permute batch rows in place (beam search: row i takes the cache of row index[i]); only the first
        ``length`` slots are copied when given."""
        if torch.equal(index, torch.arange(len(index), device=index.device)):
            return
        n = self.max_len if length is None else length
        for t in self.k + self.v:
            t[:, :, :n] = t[:, :, :n].index_select(0, index)
