"""The Zero2LLM decoder-only transformer, top to bottom in one file.

    tokens -> embed_tokens -> n_layers x Block -> norm -> lm_head -> logits
    Block:  x = x + Attention(RMSNorm(x))      (RoPE, grouped-query attention, optional q/k norm)
            x = x + MLP-or-MoE(RMSNorm(x))     (SwiGLU; MoE = router + top-k experts + shared experts)

Parameter names are exactly those of Hugging Face Llama / Qwen2 / Qwen3 / Qwen3-MoE, so a saved
folder is a transformers checkpoint (see config.py for which class loads which config, and hf.py,
which reads and writes the folders, for the few exact re-parameterisations some of them need).
The numerics follow the same classes (RMSNorm in fp32, rotate-half RoPE, router softmax
in fp32), which tests/test_model.py checks logit for logit against transformers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import hf
from .attention import tiled_causal_attention, use_tiled_attention
from .config import ModelConfig
from .cpu_linear import CPULinear, project


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Pre-allocated keys/values for incremental decoding.

    One [B, n_kv_heads, max_len, head_dim] buffer per layer, written in place, so a decode
    step costs no allocation and no torch.cat of the whole history. All rows share one
    length: batched prompts are left-padded, so row b's real tokens end at the same column.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0  # number of positions already written (the same for every layer after a forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v of one layer after the cached ones; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions needed, allocated max_len={self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer wrote its n new positions."""
        self.length += n


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as HF does) so bf16 training keeps a stable scale.

    F.rms_norm computes x * rsqrt(mean(x^2) + eps), the op-by-op formula of HF's LlamaRMSNorm, with the same
    numbers: on CUDA PyTorch has one fused kernel for it (one pass over memory instead of five); on CPU it runs
    the same ops one by one.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of RoPE, and the attention scale that YaRN applies to cos/sin.

    Plain RoPE rotates channel pair i at angle pos * theta^(-2i/d). The scalings stretch the
    context a model was trained on by `factor`, each mirroring transformers' _compute_*_parameters
    so imported and exported models agree:
      linear: every frequency divided by factor (position interpolation).
      llama3 (Llama 3.1): wavelengths longer than original_len / low_freq_factor are interpolated,
        shorter than original_len / high_freq_factor kept, with a smooth blend between.
      yarn (arXiv 2309.00071): low-frequency pairs (which never complete a turn within the
        training length) are interpolated, high-frequency pairs kept, with a linear ramp between,
        and cos/sin are scaled by 0.1*ln(factor)+1.
    """
    d, base = config.head_dim, config.rope_theta
    # device="cpu": also right when the model is built under `with torch.device("meta")` (from_pretrained)
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)
    inv_freq = 1.0 / pos_freqs
    if config.rope_scaling is None:
        return inv_freq, 1.0
    if config.rope_scaling["type"] == "linear":
        return inv_freq / float(config.rope_scaling["factor"]), 1.0
    if config.rope_scaling["type"] == "llama3":
        return llama3_frequencies(inv_freq, config.rope_scaling), 1.0

    s = config.rope_scaling
    factor = float(s["factor"])
    original_len = int(s["original_max_position_embeddings"])
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, s["mscale"]) / get_mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The channel index whose wavelength fits num_rotations times into the training length.
        return (d * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency pairs (keep), 0 for low-frequency ones (interpolate)
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attention_factor)


def llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent interpolation (see rope_frequencies)."""
    factor, original_len = float(s["factor"]), int(s["original_max_position_embeddings"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original_len / high) & (wavelen <= original_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos and signed sin for given positions, computed on the fly (cheap) so any length and any position ids work.

    HF's rotate-half RoPE is x * cos + cat(-x2, x1) * sin with sin = cat(s, s). Since cat(-x2, x1) * cat(s, s)
    = roll(x, d/2) * cat(-s, s), the sign is folded into sin here once per forward, and apply_rope needs one
    roll instead of a chunk, a negation and a cat per layer (bit-identical results).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(config)
        # A plain attribute, not a buffer: model.to(bfloat16) would round the frequencies.
        self.inv_freq = inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, signed sin [B, 1, T, head_dim]."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: pair (i, i + d/2), as HF
        sin = emb.sin()
        sin[..., : sin.shape[-1] // 2].neg_()
        cos, sin = (emb.cos() * self.attention_scaling).to(dtype), (sin * self.attention_scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, head_dim]: one head axis, broadcast over the heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos, signed sin: [B, 1, T, head_dim] (RotaryEmbedding)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads <= n_heads share keys/values)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.flash_attn = config.flash_attn
        self.tiled: bool | None = None  # None = auto (model/attention.py use_tiled_attention); True/False forces it
        self.dropout = config.dropout
        qkv_bias = config.qkv_bias or config.attention_bias  # Qwen2: q/k/v only; Llama's attention_bias: all four
        self.q_proj = CPULinear(config.dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = CPULinear(config.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = CPULinear(config.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = CPULinear(self.n_heads * self.head_dim, config.dim, bias=config.attention_bias)
        # Qwen3: RMSNorm over each head's q and k keeps attention logits bounded (fewer loss spikes).
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # now [B, n_kv_heads, past + T, head_dim]

        dropout = self.dropout if self.training else 0.0
        dtype = _compute_dtype(q)  # autocast's dtype when it is on: what SDPA would cast q, k, v to
        if self.flash_attn and T == 1 and not is_causal and self.n_heads != self.n_kv_heads:
            # Decoding one token: the query heads that share a KV head become that head's query "positions"
            # ([B, n_kv_heads, group, head_dim]); nothing is causal-masked for a single query, so this is the
            # same attention with the GQA broadcast done inside one plain kernel call (faster than enable_gqa).
            group = q.reshape(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            y = F.scaled_dot_product_attention(group, k, v, attn_mask=mask).reshape(B, self.n_heads, 1, self.head_dim)
        elif self.flash_attn and is_causal and mask is None and dropout == 0 and (
                use_tiled_attention(q, dtype) if self.tiled is None else self.tiled):
            # Causal and unpadded on a CPU: only the lower triangle of the scores is computed (model/attention.py).
            y = tiled_causal_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        elif self.flash_attn:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
        else:
            # The same computation written out: what SDPA fuses into one kernel.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, heads, T, S]
            if is_causal:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att.float(), dim=-1).to(q.dtype)
            att = F.dropout(att, p=dropout)
            y = att @ v
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = CPULinear(dim, hidden_dim, bias=bias)
        self.up_proj = CPULinear(dim, hidden_dim, bias=bias)
        self.down_proj = CPULinear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


CPU_EXPERT_ROWS = 64  # bf16/fp16 on CPU: expert token counts are padded to a multiple of this (MoE.forward)
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


class MoE(nn.Module):
    """Mixture of experts: each token goes to its top-k routed experts, plus always-on shared experts.

    Names follow Qwen3-MoE checkpoints on the Hub: mlp.gate (router), mlp.experts.E.{gate,up,down}_proj.
    transformers 5 fuses those per-expert tensors into mlp.experts.gate_up_proj/down_proj in memory
    when it loads, and splits them back when it saves, so the files need no conversion either way.
    Shared experts use DeepSeek's layout: n_shared_experts SwiGLU experts of width moe_hidden_dim
    are one SwiGLU of width n_shared_experts * moe_hidden_dim (same function, one matmul).
    With shared_expert_gate (Qwen2-MoE), their output is scaled per token by sigmoid(w . x).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.norm_topk_prob, self.seq_aux = config.norm_topk_prob, config.seq_aux
        self.aux_loss_alpha = config.aux_loss_alpha
        self.gate = CPULinear(config.dim, self.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(config.dim, config.moe_hidden_dim) for _ in range(self.n_experts))
        self.shared_experts = (
            MLP(config.dim, config.moe_hidden_dim * config.n_shared_experts) if config.n_shared_experts > 0 else None
        )
        self.shared_expert_gate = CPULinear(config.dim, 1, bias=False) if config.shared_expert_gate else None
        self.grouped_mm: bool | None = None  # None = auto (see _use_grouped_mm)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, dim] -> router probs [N, E] (fp32), top-k weights [N, k], top-k expert ids [N, k]."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        probs, weights, experts = self.route(flat)

        # Sorted-token dispatch: order the (token, slot) assignments by expert so each expert's tokens are one
        # contiguous slice (the layout a grouped GEMM consumes), run the experts, then scatter-add back.
        # In bf16/fp16 on CPU each slice is padded to a multiple of CPU_EXPERT_ROWS rows: oneDNN builds a kernel
        # for every new matmul shape and raw per-expert counts change every step; padded, the few shapes repeat
        # and stay cached. fp32 goes to MKL, which has no such cost, and stays unpadded (a matmul's rounding can
        # depend on its row count, and unpadded fp32 equals transformers bit for bit).
        # Padding rows read an appended zero token and scatter back into it.
        N = B * T
        flat_experts = experts.reshape(-1)  # [N*k]
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        dtype = _compute_dtype(flat)
        multiple = CPU_EXPERT_ROWS if x.device.type == "cpu" and dtype != torch.float32 else 1
        sizes = (counts + multiple - 1) // multiple * multiple  # each expert's slice, padded
        # Row of the i-th sorted assignment in the padded layout: i plus the padding of the experts before its own.
        shift = (sizes.cumsum(0) - sizes) - (counts.cumsum(0) - counts)
        rows = torch.arange(order.numel(), device=x.device) + shift[flat_experts[order]]
        n_rows = order.numel() if multiple == 1 else int(sizes.sum())  # on GPU, no host sync here
        token_of = order.new_full((n_rows,), N).index_copy_(0, rows, order // self.top_k)
        # Weighted and summed in the experts' compute dtype: a mixed bf16 * fp32 multiply is a slow CPU path.
        weight_of = weights.new_zeros(n_rows, dtype=dtype).index_copy_(0, rows, weights.reshape(-1)[order].to(dtype))
        # Cast once, before the gather (autocast would cast per expert matmul); index_select's backward is an
        # index_add, faster on CPU than the accumulating index_put of tensor[index].
        tokens = F.pad(flat.to(dtype), (0, 0, 0, 1)).index_select(0, token_of)
        if self._use_grouped_mm(flat, dtype):
            y = self._experts_grouped(tokens, sizes)
        else:
            # Every expert runs, even on 0 tokens, so all get a (zero) gradient: DDP needs no
            # find_unused_parameters. One host sync per layer for the slice sizes.
            y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, tokens.split(sizes.tolist()))])
        out = y.new_zeros(N + 1, D).index_add_(0, token_of, y * weight_of[:, None])[:N]
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared

        if self.training and self.aux_loss_alpha > 0:
            valid = token_mask.reshape(B * T) if token_mask is not None else None
            n_groups = B if self.seq_aux else 1
            aux = self.aux_loss_alpha * load_balancing_loss(probs, experts, self.n_experts, n_groups, valid)
        else:
            aux = flat.new_zeros((), dtype=torch.float32)
        return out.view(B, T, D), aux

    def _experts_grouped(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts at once with grouped GEMMs (torch._grouped_mm: one kernel per projection for every
        expert, row groups given by offsets, no host sync). The per-expert weights are stacked on the fly
        ([E, out, in]), so checkpoints keep Hugging Face's per-expert tensors."""
        offs = counts.cumsum(0).to(torch.int32)

        def stacked(name: str) -> torch.Tensor:
            w = torch.stack([getattr(e, name).weight for e in self.experts]).to(tokens.dtype)
            return w.transpose(-2, -1)  # [E, in, out]

        with torch.autocast(tokens.device.type, enabled=False):  # operands are already in the compute dtype
            gate = torch._grouped_mm(tokens, stacked("gate_proj"), offs=offs)
            up = torch._grouped_mm(tokens, stacked("up_proj"), offs=offs)
            return torch._grouped_mm(F.silu(gate) * up, stacked("down_proj"), offs=offs)

    def _use_grouped_mm(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Grouped GEMMs where they exist and pay: bf16 on CUDA (sm80+), plain nn.Linear experts (not LoRA).
        `grouped_mm` True/False forces the choice (tests compare both paths on CPU, where bf16 also runs)."""
        if self.grouped_mm is not None:
            return self.grouped_mm
        return (x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                and torch.cuda.get_device_capability(x.device) >= (8, 0)
                and all(isinstance(getattr(e, n), nn.Linear) for e in self.experts for n in EXPERT_PROJ))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the tensor's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, n_experts: int, n_groups: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """E * sum_e f_e * P_e, averaged over groups (Switch Transformer eq. 4; DeepSeek's sequence-wise variant).

    f_e: fraction of routed (token, slot) assignments that went to expert e (no gradient);
    P_e: mean router probability of e. Both are 1/E under perfect balance, giving a loss of 1.
    n_groups=1 pools the whole batch (token-level, as Switch/Qwen); n_groups=B balances each
    sequence separately (seq_aux, as DeepSeek-V3/MiniMind). valid (0/1 per token) drops padding.
    HF's Qwen3-MoE aux loss is top_k times this (it normalises f per slot) and pools all layers
    where we sum per-layer losses; the forward passes agree exactly, only the training penalty differs.
    """
    N, k = experts.shape
    valid = probs.new_ones(N) if valid is None else valid.to(probs.dtype)
    chosen = F.one_hot(experts, n_experts).sum(1).to(probs.dtype)  # [N, E]: 1 if the token picked e
    chosen, p = chosen.view(n_groups, -1, n_experts), probs.view(n_groups, -1, n_experts)
    valid = valid.view(n_groups, -1, 1)
    n_tokens = valid.sum(1).clamp(min=1)  # [G, 1]
    f = (chosen * valid).sum(1) / (n_tokens * k)  # [G, E]
    P = (p * valid).sum(1) / n_tokens  # [G, E]
    return n_experts * (f * P).sum(-1).mean()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, not called where it is the identity (inference, p = 0): decoding would call it 2 x layers + 1
    times a token for nothing."""
    return F.dropout(x, p, training) if training and p > 0 else x


class Block(nn.Module):
    """Pre-norm decoder layer (norm before each sub-layer keeps the residual stream an identity path)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if config.use_moe else MLP(config.dim, config.hidden_dim, config.mlp_bias)
        self.dropout = config.dropout  # on each sub-layer's output, in training

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the layer's output, its MoE load-balancing loss; None for a dense layer)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache)
        x = x + dropout(h, self.dropout, self.training)
        h, aux = self.post_attention_layernorm(x), None
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(h, token_mask)
        else:
            h = self.mlp(h)
        return x + dropout(h, self.dropout, self.training), aux


# ----------------------------------------------------------------------------- the model


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of a [B, T] 0/1 mask is real tokens first, then padding (or none)."""
    mask = attention_mask.bool()
    return bool(mask[:, 0].all() & (mask[:, :-1] >= mask[:, 1:]).all())


def default_positions(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                      device: torch.device) -> torch.Tensor:
    """[B, T] positions of T new tokens after `past` cached ones: counting real tokens only where attention_mask
    ([B, past + T], 1 = real) is given, so a left-padded row sees the positions of its unpadded sequence."""
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    return torch.arange(past, past + T, device=device).expand(B, T)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, vocab]
    aux_loss: torch.Tensor  # scalar, MoE load-balancing loss already times aux_loss_alpha; 0 when dense or eval


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        # A ModuleDict named "model" gives the HF parameter names: model.embed_tokens.weight, model.layers.0...
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.dim),
                layers=nn.ModuleList(Block(config, i) for i in range(config.n_layers)),
                norm=RMSNorm(config.dim, config.norm_eps),
            )
        )
        self.lm_head = CPULinear(config.dim, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.dropout = config.dropout  # on the embeddings, in training
        self.gradient_checkpointing = False  # recompute each block in backward (trainer/parallel.py sets it)
        self.generation_config: dict | None = None  # generation_config.json of the folder it was loaded from
        self._init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings, input and output embeddings share one matrix: fewer parameters, and the
        standard for small LMs. (Also called after loading weights by assignment, which unties them.)"""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self) -> None:
        """N(0, initializer_range) everywhere; norms at 1, biases at 0.

        Projections that write into the residual stream (o_proj, down_proj) get std / sqrt(2 * n_layers)
        (GPT-2): each layer adds two such outputs to the stream, so with plain init the residual's
        variance would grow with depth; this scaling keeps it roughly constant at init.
        """
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput(logits [B, T, V], aux_loss scalar).

        attention_mask: [B, past + T], 1 = real token, 0 = padding (left padding for batched prompts).
            Leave it None for unpadded batches: the fast is_causal path is used then.
        position_ids: default counts real tokens only, so a left-padded row sees the same positions
            as the unpadded sequence.
        kv_cache: when given, the T new tokens are appended after kv_cache.length cached positions (a
            KVCache; model/engine.py's RowKVCache appends after each row's own length, and the attention_mask
            says which of the kv_cache.length + T columns each row may see).
        logits_to_keep: compute logits for only the last n positions (0 = all); generation needs 1.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        device = input_ids.device
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                    "(batch, cached + new tokens)"
                )
            attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = default_positions(attention_mask, B, T, past, device)
        mask, is_causal = self._attention_mask(attention_mask, T, past, device)
        token_mask = attention_mask[:, past:] if attention_mask is not None else None

        x = dropout(self.model.embed_tokens(input_ids), self.dropout, self.training)
        cos, sin = self.rotary(position_ids, x.dtype)
        aux_loss = torch.zeros((), device=device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:  # keep only each block's input; recompute in backward
                x, layer_aux = checkpoint(layer, x, cos, sin, mask, is_causal, kv_cache, token_mask,
                                          use_reentrant=False)
            else:
                x, layer_aux = layer(x, cos, sin, mask, is_causal, kv_cache, token_mask)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux  # summed over MoE layers (DeepSeek/MiniMind)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.model.norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return ModelOutput(self.lm_head(x), aux_loss)

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [B or 1, 1, T, past + T] where True = may attend, is_causal flag).

        No padding and no cache: None + is_causal (the fastest kernels). Right padding only (SFT and DPO
        batches): the same, since under causal attention a real token never sees a later position, so never
        padding; what the padding positions compute is never used. One new token, no padding: it may see
        everything, so no mask at all. Otherwise an explicit causal & padding mask.
        """
        if past == 0 and (attention_mask is None or right_padded(attention_mask)):
            return None, True
        if attention_mask is None and T == 1:
            return None, False
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past + T, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :]
            # A left-padding query would see no key at all (softmax over only -inf is NaN): such a query sees
            # itself instead (padding outputs are never used). Only such a query: in a continuous batch
            # (model/engine.py) the rows' newest tokens sit in different columns, and column past + t holds
            # another row's token, or nothing, for every row but the longest.
            allowed = allowed | ((k_pos == q_pos)[None, None] & ~allowed.any(-1, keepdim=True))
        return allowed, False

    # ------------------------------------------------------------------------- accounting

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once). exclude_embeddings drops the input embedding table;
        active drops the routed experts one token is not sent to (each a bias-free SwiGLU, 3 * dim * moe_hidden_dim
        parameters), which gives a MoE model's parameters per token."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        c = self.config
        if active and c.use_moe:
            n -= c.n_layers * (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.dim * c.moe_hidden_dim
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * active matmul params + attention (PaLM, appendix B), for MFU.

        Active params: non-embedding parameters plus the lm_head matmul (even when tied), minus the
        routed experts a token does not visit. Attention adds 6 * layers * heads * head_dim * seq_len: PaLM's
        12 * ... counts every query against every key, but a causal token attends on average to half of them, and
        counting the masked half would credit work a causal kernel need not do.
        """
        c = self.config
        n = self.num_params(exclude_embeddings=True, active=True)
        if c.tie_word_embeddings:
            n += c.vocab_size * c.dim
        T = seq_len or c.max_seq_len
        return 6 * n + 6 * c.n_layers * c.n_heads * c.head_dim * T

    # ------------------------------------------------------------------------- checkpoints (model/hf.py)

    def save_pretrained(self, save_dir: str | Path) -> None:
        """Write this model as a Hugging Face folder; see hf.save_pretrained."""
        hf.save_pretrained(self, save_dir)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> "Transformer":
        """Load a folder written by save_pretrained or by transformers; see hf.from_pretrained."""
        return hf.from_pretrained(cls, model_dir, device, dtype)
