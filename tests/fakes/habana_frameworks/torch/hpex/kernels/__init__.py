"""Stand-in of `hpex.kernels`: the fused kernels optimum-habana imports, as plain torch on CPU tensors.

optimum-habana calls them only on `device.type == "hpu"` tensors (never here) except `FusedSDPA`
(`use_flash_attention=True`), which computes what the kernel computes: softmax(q k^T * scale + mask) v,
causal when asked, keys and values shared by groups of query heads.
"""

from __future__ import annotations

import math

import torch


class FusedSDPA:
    calls: list[dict] = []

    @staticmethod
    def apply(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        softmax_mode: str = "None",
        recompute_mode: bool | None = None,
        valid_sequence_lengths: torch.Tensor | None = None,
        padding_side: str = "left",
    ) -> torch.Tensor:
        FusedSDPA.calls.append({"is_causal": is_causal, "q_len": query.shape[-2], "kv_len": key.shape[-2]})
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        if key.dim() == query.dim() and key.shape[1] != query.shape[1]:  # grouped-query attention
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = torch.matmul(query, key.transpose(-2, -1)).float() * scale
        if is_causal:
            q_len, kv_len = scores.shape[-2], scores.shape[-1]
            causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        if attn_mask is not None:
            scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, -1e30)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if dropout_p > 0.0:
            probs = torch.nn.functional.dropout(probs, dropout_p)
        return torch.matmul(probs, value)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryPosEmbeddingHelperV2:
    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids=None, *args) -> torch.Tensor:
        if position_ids is not None:
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        return x * cos + _rotate_half(x) * sin


class RotaryPosEmbeddingHelperV3(RotaryPosEmbeddingHelperV2):
    pass


class CTCLoss:
    @staticmethod
    def apply(*args, **kwargs):
        raise NotImplementedError("stand-in bridge: CTCLoss is import-only")


def reset() -> None:
    FusedSDPA.calls.clear()
