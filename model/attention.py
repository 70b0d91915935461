"""Causal attention over the lower triangle only: the model's causal attention on CPUs.

PyTorch's CPU kernel behind F.scaled_dot_product_attention computes every query against every key and masks
afterwards, so a causal mask saves it nothing, and without AMX its bf16 path runs no faster than fp32
(bench/RESULTS.md, bench/attention.py). Causal attention needs only the lower triangle of the T x T scores.

Here the queries go in tiles of TILE positions, and a tile meets only the keys up to its own last position:
(T + TILE) / 2T of the square's work. Per tile, the scores come from a matmul in the input dtype and PyTorch's fused
softmax kernel turns them into probabilities in one call (in bf16 it reads bf16, computes in fp32 and writes bf16:
as in transformers' eager attention, the probabilities are rounded to bf16 before the product with V). The backward
recomputes each tile's probabilities the same way and takes their gradient with the fused softmax backward kernel
(the flash-attention backward's order, Dao et al. 2022, algorithm 2), so nothing T x T is stored, not even a
logsumexp. Written as separate elementwise ops instead, the softmax's casts between bf16 and fp32 and its passes
over each score tile took nearly as long as the tile's matmuls (bench/RESULTS.md). Grouped-query heads: the query
heads that share a KV head are stacked as the rows of one matrix, ordered (position, head), so a tile is a
contiguous block of rows, one matmul serves the whole group, and dK/dV sum over the group inside it. Every product
is a batched matmul over [batch x KV heads, rows, head_dim] views, with no copy before it.

The output is written in the [B, T, heads, head_dim] layout that o_proj reads, so the model's transpose and
reshape after attention copy nothing. Used for causal, unpadded sequences longer than one tile (training,
validation, a generation's prefill; model/model.py Attention decides), in fp32 or bf16.
"""

from __future__ import annotations

import torch

TILE = 64  # query positions per tile: smaller tiles skip more of the square but make more, smaller matmuls


# Read once at import: a plain value, which torch.compile reads as a constant (a cached function it would trace).
_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which PyTorch's bf16/fp16 CPU matmul and attention kernels use when present."""
    return _AMX


def use_tiled_attention(q: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether tiled_causal_attention beats SDPA for this causal call: on CPUs, for sequences longer than a tile,
    except bf16/fp16 on CPUs with AMX, where SDPA's kernel packs its blocks for the AMX tiles and runs several
    times faster than elsewhere (bench/RESULTS.md: a lower-triangle backward in torch ops was 0.92x SDPA's there)."""
    if q.device.type != "cpu" or q.shape[-2] <= TILE:
        return False
    return dtype == torch.float32 or not cpu_has_amx()


def tiled_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention, softmax(q k^T / sqrt(head_dim)) v over the lower triangle.

    q: [B, heads, T, head_dim], k and v: [B, kv_heads, T, head_dim], all in the compute dtype. Returns
    [B, heads, T, head_dim], a view of [B, T, heads, head_dim] memory (so .transpose(1, 2).reshape is free).
    """
    return _TiledCausalAttention.apply(q, k, v)


def _tiles(T: int) -> list[tuple[int, int]]:
    """(start, end) of each tile of query positions."""
    return [(start, min(start + TILE, T)) for start in range(0, T, TILE)]


def _future_mask(n: int, rep: int, device: torch.device) -> torch.Tensor:
    """True where a row of a tile's diagonal block (position i of the tile, one of rep heads) would see a
    later key of the same tile: [n * rep, n]."""
    future = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
    return future[:, None].expand(n, rep, n).reshape(n * rep, n)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, T, D] -> [B * kv_heads, T * rep, D] contiguous, rows ordered (position, head of the group)."""
    B, H, T, D = x.shape
    grouped = x.transpose(1, 2).reshape(B, T, kv_heads, H // kv_heads, D).transpose(1, 2)
    return grouped.reshape(B * kv_heads, T * (H // kv_heads), D)


def _probabilities(q: torch.Tensor, k: torch.Tensor, start: int, end: int, rep: int) -> torch.Tensor:
    """softmax(q k^T) of one tile (query positions start..end, rows q, already scaled) over keys 0..end, with the
    tile's own later positions masked: [B * kv_heads, (end - start) * rep, end] in q's dtype."""
    s = torch.bmm(q, k[:, :end].transpose(1, 2))
    s[..., start:end].masked_fill_(_future_mask(end - start, rep, q.device), float("-inf"))
    return torch.softmax(s, -1)


class _TiledCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        KV = k.shape[1]
        rep, scale = H // KV, D ** -0.5
        qg = _grouped(q * scale, KV)
        k, v = k.reshape(B * KV, T, D), v.reshape(B * KV, T, D)
        out = torch.empty(B, T, KV, rep * D, dtype=q.dtype, device=q.device)  # the model's [B, T, heads, D] layout
        for start, end in _tiles(T):
            rows = slice(start * rep, end * rep)
            o = torch.bmm(_probabilities(qg[:, rows], k, start, end, rep), v[:, :end])  # [B * KV, n * rep, D]
            out[:, start:end] = o.view(B, KV, end - start, rep * D).transpose(1, 2)
        ctx.save_for_backward(qg, k, v)
        ctx.scale, ctx.shape = scale, (B, H, T, D)
        return out.view(B, T, H, D).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qg, k, v = ctx.saved_tensors
        B, H, T, D = ctx.shape
        KV = k.shape[0] // B
        rep, dtype = H // KV, qg.dtype
        dog = _grouped(dout.to(dtype), KV)
        dq = torch.empty(B, T, KV, rep * D, dtype=dtype, device=qg.device)
        dk = torch.zeros(B * KV, T, D, dtype=torch.float32, device=qg.device)  # summed over tiles in fp32
        dv = torch.zeros_like(dk)
        for start, end in _tiles(T):
            rows = slice(start * rep, end * rep)
            qi, doi = qg[:, rows], dog[:, rows]
            p = _probabilities(qi, k, start, end, rep)
            dv[:, :end] += torch.bmm(p.transpose(1, 2), doi)
            ds = torch._softmax_backward_data(torch.bmm(doi, v[:, :end].transpose(1, 2)), p, -1, dtype)
            dq[:, start:end] = torch.bmm(ds, k[:, :end]).view(B, KV, end - start, rep * D).transpose(1, 2)
            dk[:, :end] += torch.bmm(ds.transpose(1, 2), qi)  # qi carries the scale already
        dq = dq.mul_(ctx.scale).view(B, T, H, D).transpose(1, 2)
        return dq, dk.to(dtype).view(B, KV, T, D), dv.to(dtype).view(B, KV, T, D)
