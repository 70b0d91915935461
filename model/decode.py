"""One new token a row through the whole model on a CPU, in as few torch calls as its arithmetic needs: the decode
step of generate() and of the server's engine (model/engine.py) wherever it applies.

At a few rows a token, a CPU decode step streams every weight from memory through four matrix-vector products a
layer, with about twenty small ops a layer between them. Each small op costs far more than its arithmetic: Python
and dispatch overhead, made larger because the weights streamed between ops push the interpreter's and PyTorch's
own working set out of the caches. Transformer.forward pays for what makes it general: a module call per sub-layer,
per-call checks of which kernel each product takes, q and k rotated apart, layout changes for the cache and for
SDPA. None of that changes within a generation, so here the same layer is written out once for one new token a row:
two norms, the four packed products (q/k/v stacked, o, gate/up stacked, down), one rotation of q and k together,
two cache writes, one SDPA call and the SwiGLU (bench/RESULTS.md, decode, has the gain).

The arithmetic is Transformer.forward's op for op: the same packed weights (CPULinear.packed) through the same
oneDNN call, the same elementwise ops rounded to bf16 in the same order, so logits and tokens are the same bit for
bit (tests/test_fast_paths.py). It applies where every product takes the packed weights (a frozen bf16 model on an x86
CPU with oneDNN's bf16 kernels, no LoRA wrapper, no autocast: eval_model's and its server's models in the
default dtype), to dense SwiGLU layers with SDPA attention and no q/k norm, in eval mode; rows may be left-padded
or each at its own position, as the forward allows. Anything else decodes through Transformer.forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_linear import packs
from .model import KVCache, Transformer, apply_rope, default_positions

_product = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.forward for a bf16 x: F.rms_norm upcasts to fp32 inside and rounds its result to x's dtype, which is
    what RMSNorm's x.float() and .to(x.dtype) around it do."""
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps)


class CPUDecodeStep:
    """step(token [B], cache) -> logits [B, vocab] of each row's next token, with every layer's key and value
    written at cache.length and the cache advanced by one. Build it with CPUDecodeStep.build, which says whether it
    applies; the packed weights are taken once, at build (a generation's weights do not change)."""

    def __init__(self, model: Transformer) -> None:
        c = model.config
        self.heads, self.kv_heads, self.head_dim, self.eps = c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
        self.embed, self.rotary, self.norm = model.model.embed_tokens.weight, model.rotary, model.model.norm.weight
        self.layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append((block.input_layernorm.weight, attn.q_proj.packed(attn.k_proj, attn.v_proj)[:2],
                                attn.o_proj.packed()[:2], block.post_attention_layernorm.weight,
                                mlp.gate_proj.packed(mlp.up_proj)[:2], mlp.down_proj.packed()[:2]))
        self.hidden = model.model.layers[0].mlp.gate_proj.out_features  # SwiGLU's width: gate's half of gate/up
        self.head = model.lm_head.packed()[:2]

    @classmethod
    def build(cls, model: Transformer, batch_size: int) -> CPUDecodeStep | None:
        """The step for this model at this batch size, or None where it does not apply (the module docstring)."""
        c = model.config
        if (_product is None or model.training or c.use_moe or c.qk_norm or not c.flash_attn
                or torch.is_autocast_enabled("cpu") or any(p.dtype != torch.bfloat16 for p in model.parameters())):
            return None
        x = torch.empty(batch_size, c.dim, dtype=torch.bfloat16, device=model.lm_head.weight.device)
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            if not all(packs(x, layers) for layers in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,),
                                                       (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,))):
                return None
        return cls(model) if packs(x, (model.lm_head,)) else None

    def __call__(self, token: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """token [B]; cache, attention_mask [B, cache.length + 1] and position_ids [B, 1] as Transformer.forward
        takes them for one new token a row (a KVCache or model/engine.py's RowKVCache, padding, own positions)."""
        H, KV, D, past = self.heads, self.kv_heads, self.head_dim, cache.length
        B = token.shape[0]
        if position_ids is None:
            position_ids = default_positions(attention_mask, B, 1, past, token.device)
        # The forward's own mask ([B, 1, 1, past + 1], broadcast over each KV head's query rows), or none unpadded.
        mask = None if attention_mask is None else Transformer._attention_mask(attention_mask.bool(), 1, past,
                                                                              token.device)[0]
        x = self.embed[token]  # [B, dim]
        cos, sin = self.rotary(position_ids, x.dtype)
        cos, sin = cos.view(B, 1, D), sin.view(B, 1, D)  # broadcast over the heads of [B, heads, D]
        for i, (norm1, qkv, o, norm2, gate_up, down) in enumerate(self.layers):
            h = _product(_rms_norm(x, norm1, self.eps), *qkv, "none", [], "")  # [B, (H + 2 KV) * D]: q, k, v
            qk = apply_rope(h[:, :(H + KV) * D].view(B, H + KV, D), cos, sin)  # q's heads and k's at once
            k, v = cache.update(i, qk[:, H:, None], h[:, (H + KV) * D:].view(B, KV, 1, D))
            # The query heads that share a KV head as that head's query rows (Attention's one-token path).
            y = F.scaled_dot_product_attention(qk[:, :H].view(B, KV, H // KV, D), k, v, attn_mask=mask)
            x = x + _product(y.view(B, H * D), *o, "none", [], "")
            h = _product(_rms_norm(x, norm2, self.eps), *gate_up, "none", [], "")
            x = x + _product(F.silu(h[:, :self.hidden]) * h[:, self.hidden:], *down, "none", [], "")
        cache.advance(1)
        return _product(_rms_norm(x, self.norm, self.eps), *self.head, "none", [], "")
