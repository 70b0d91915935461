"""Model hyper-parameters, named presets, and the Hugging Face config.json mapping.

One dataclass describes every model this repo can build. `to_hf_dict()` writes the
config.json that transformers reads, so a saved folder loads with
`AutoModelForCausalLM.from_pretrained(folder)`:

    dense, no qk-norm            -> "llama"      (LlamaForCausalLM; attention_bias, mlp_bias)
    dense, no qk-norm, qkv_bias  -> "qwen2"      (Qwen2ForCausalLM)
    dense, qk-norm               -> "qwen3"      (Qwen3ForCausalLM)
    MoE, qk-norm, no shared exp. -> "qwen3_moe"  (Qwen3MoeForCausalLM)
    MoE, no qk-norm              -> "qwen2_moe"  (Qwen2MoeForCausalLM; shared experts, gated or not)
    MoE, qk-norm, shared experts -> "qwen3_next" (Qwen3NextForCausalLM, every layer full attention)

The last two are exact re-parameterisations, done on the weights by model/hf.py: an ungated
shared expert is written with a zero sigmoid gate (sigmoid(0) = 1/2) and a doubled down_proj,
Qwen3-Next's output gate is zero with a doubled o_proj, its (1 + w) norms get w - 1; powers of
two, so the logits are unchanged. What transformers has no class for (dense with qk-norm and
mlp_bias, MoE with an o_proj bias and no qk-norm, dim not divisible by n_heads for Llama) is
written with model_type "zero2llm": transformers then refuses to load it with a clear
"unrecognized model type" error instead of silently producing garbage. Our own fields
(dropout, flash_attn, seq_aux, ...) are stored under the "zero2llm" key so
`from_hf_dict(to_hf_dict(c)) == c` exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def flag(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field that is also one of train.py's --flags, with its help string. Other keywords go to
    argparse (choices=, nargs=, type=, ...), except cli=False: a field with no flag, aliases=("--other_name",): more
    names of the same flag (another project's), declared here, beside the flag they stand for, and negation=value:
    what --no-flag sets, for a str switch (a bool field has --no-flag anyway)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelConfig:
    # Vocabulary and shape.
    vocab_size: int = flag(6400, "Vocabulary size (default: the tokenizer's).")
    dim: int = flag(512, "Hidden size (d_model).")
    n_layers: int = flag(8, "Transformer blocks.")
    n_heads: int = flag(8, "Query heads.")
    n_kv_heads: int = flag(2, "Key/value heads (grouped-query attention; must divide n_heads).")
    head_dim: int | None = flag(None, "Size of one head (default: dim / n_heads).")
    hidden_dim: int | None = flag(None, "SwiGLU width (default: 8/3 x dim rounded up to multiple_of).")
    multiple_of: int = flag(64, "Round the default SwiGLU width up to a multiple of this.")
    max_seq_len: int = flag(512, "Context length: training row length and RoPE range.")
    # Positions and normalisation.
    rope_theta: float = flag(1e6, "RoPE base frequency.")
    # YaRN: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}; Llama 3.1: {"type": "llama3",
    # "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict | None = flag(None, "RoPE scaling for longer contexts (yarn, llama3 or linear).")
    norm_eps: float = flag(1e-5, "RMSNorm epsilon.")
    # Attention.
    dropout: float = flag(0.0, "Dropout on attention weights and residual branches.")
    flash_attn: bool = flag(True, "Fused attention kernels: F.scaled_dot_product_attention (flash kernels on CUDA), "
                                "and on CPUs the lower-triangle causal kernel of model/attention.py; off: the "
                                "explicit math path.")
    qk_norm: bool = flag(False, "Per-head RMSNorm on queries and keys (Qwen3).")
    tie_word_embeddings: bool = flag(True, "Share the input embedding with the output projection.")
    attention_bias: bool = flag(False, "Bias terms on q/k/v/o projections (Llama's attention_bias).")
    qkv_bias: bool = flag(False, "Bias terms on q/k/v only (Qwen2); implied by --attention_bias.")
    mlp_bias: bool = flag(False, "Bias terms on the SwiGLU projections (Llama's mlp_bias; dense models only).")
    # Mixture of experts.
    use_moe: bool = flag(False, "Mixture-of-Experts MLPs instead of dense SwiGLU.")
    n_routed_experts: int = flag(4, "Routed experts per MoE layer.")
    num_experts_per_tok: int = flag(2, "Experts each token is routed to (top-k).")
    n_shared_experts: int = flag(1, "Always-on shared experts per MoE layer (0 = none, as Qwen3-MoE).")
    moe_hidden_dim: int | None = flag(None, "Width of each expert (default: hidden_dim).")
    shared_expert_gate: bool = flag(False, "Scale the shared experts' output by sigmoid(w . x) per token (Qwen2-MoE).")
    aux_loss_alpha: float = flag(0.01, "Weight of the load-balancing loss.")
    seq_aux: bool = flag(True, "Balance experts per sequence (DeepSeek) instead of per batch (Switch).")
    norm_topk_prob: bool = flag(True, "Renormalise the top-k routing weights to sum to 1.")
    # Init and special tokens.
    initializer_range: float = flag(0.02, "Std of the normal weight init.")
    bos_token_id: int | None = flag(1, "Beginning-of-sequence id (set from the tokenizer).", cli=False)
    eos_token_id: int | None = flag(2, "End-of-sequence id (set from the tokenizer).", cli=False)
    pad_token_id: int | None = flag(0, "Padding id (set from the tokenizer).", cli=False)

    def __post_init__(self) -> None:
        # Resolve the derived sizes once so every reader sees concrete numbers.
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None and self.multiple_of > 0:
            hidden = int(2 * 4 * self.dim / 3)  # SwiGLU: 2/3 of 4*dim keeps params equal to a GELU MLP
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.moe_hidden_dim is None:
            self.moe_hidden_dim = self.hidden_dim
        if self.rope_scaling is not None:  # accept HF's "rope_type" spelling, store ours ("type")
            scaling = dict(self.rope_scaling)
            scaling.setdefault("type", scaling.pop("rope_type", None))
            scaling.pop("rope_type", None)
            self.rope_scaling = scaling

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the offending field(s); returns self for chaining."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
            "for grouped-query attention",
        )
        need(self.head_dim is not None and self.head_dim > 0, f"head_dim must be > 0, got {self.head_dim}")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.hidden_dim is not None and self.hidden_dim > 0, f"hidden_dim must be > 0, got {self.hidden_dim}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            ok = tid is None or 0 <= tid < self.vocab_size
            need(ok, f"{name}={tid} is outside the vocabulary [0, {self.vocab_size})")
        if self.use_moe:
            need(self.n_routed_experts >= 1, f"n_routed_experts must be >= 1 with use_moe, got {self.n_routed_experts}")
            need(
                1 <= self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"n_routed_experts ({self.n_routed_experts})",
            )
            need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
            need((self.moe_hidden_dim or 0) > 0, f"moe_hidden_dim must be > 0, got {self.moe_hidden_dim}")
            need(self.aux_loss_alpha >= 0, f"aux_loss_alpha must be >= 0, got {self.aux_loss_alpha}")
        need(not (self.attention_bias and self.qkv_bias), "qkv_bias is implied by attention_bias; set only one")
        need(not (self.mlp_bias and self.use_moe), "mlp_bias is for dense models (experts have no bias terms)")
        need(not self.shared_expert_gate or (self.use_moe and self.n_shared_experts > 0),
             "shared_expert_gate needs use_moe and n_shared_experts > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ROPE_SCALINGS, f"rope_scaling type must be one of {', '.join(ROPE_SCALINGS)} "
                                        f"(the ones implemented), got {kind!r}")
            factor = self.rope_scaling.get("factor")
            need(factor is not None and float(factor) >= 1.0, f"rope_scaling.factor must be >= 1, got {factor}")
            need(
                kind == "linear" or int(self.rope_scaling.get("original_max_position_embeddings", 0)) > 0,
                "rope_scaling needs original_max_position_embeddings (the context length used in training)",
            )
            if kind == "llama3":
                low, high = self.rope_scaling.get("low_freq_factor"), self.rope_scaling.get("high_freq_factor")
                need(low is not None and high is not None and float(high) > float(low),
                     f"llama3 rope_scaling needs low_freq_factor < high_freq_factor, got {low} and {high}")
        return self

    # ------------------------------------------------------------------ Hugging Face mapping
    @property
    def hf_model_type(self) -> str | None:
        """The transformers model_type that computes exactly what our model computes, or None."""
        if self.use_moe:
            if self.qk_norm:
                return "qwen3_next" if self.n_shared_experts > 0 else "qwen3_moe"
            return None if self.attention_bias else "qwen2_moe"  # Qwen2-MoE's o_proj has no bias
        if self.qk_norm:
            return None if self.mlp_bias else "qwen3"
        if self.qkv_bias and not self.mlp_bias:
            return "qwen2"
        # LlamaConfig rejects hidden_size % num_attention_heads != 0 even when head_dim is explicit.
        return "llama" if self.dim % self.n_heads == 0 else None

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents (HF field names; ours under "zero2llm")."""
        model_type = self.hf_model_type
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope = {
                "rope_type": self.rope_scaling["type"],
                "rope_theta": float(self.rope_theta),
                **{k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")},
            }
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES.get(model_type, "Zero2LLMForCausalLM")],
            "model_type": model_type or "zero2llm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_parameters": rope,
            "rope_theta": float(self.rope_theta),  # older transformers (v4) read it from the top level
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if model_type not in ("qwen2", "qwen2_moe"):  # q/k/v-only bias goes out with a zero o_proj bias (model/hf.py)
            d["attention_bias"] = self.attention_bias or self.qkv_bias
        if model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if model_type == "qwen2_moe":
            d["qkv_bias"] = self.qkv_bias
        if model_type not in ("llama", None):
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers)
        if self.use_moe:
            d.update(
                moe_intermediate_size=self.moe_hidden_dim,
                num_experts=self.n_routed_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.aux_loss_alpha,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                output_router_logits=False,
            )
            if model_type in ("qwen2_moe", "qwen3_next"):
                d["shared_expert_intermediate_size"] = self.moe_hidden_dim * self.n_shared_experts
        if model_type == "qwen3_next":  # its linear-attention layers and partial RoPE switched off
            d["layer_types"] = ["full_attention"] * self.n_layers
            rope["partial_rotary_factor"] = 1.0
        if model_type is None:
            d["zero2llm_note"] = (
                "transformers has no class for this architecture (dense with qk_norm and mlp_bias, MoE with an "
                "o_proj bias and no qk_norm, or dim not divisible by n_heads); load it with "
                "model.Transformer.from_pretrained"
            )
        d["zero2llm"] = asdict(self)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_hf_dict; also reads plain Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE config.json files.

        The HF fields are the source of truth for the architecture; the "zero2llm" block only
        supplies what HF has no field for (dropout, flash_attn, seq_aux, an ungated shared expert, ...).
        What our model cannot compute (sliding windows, linear attention, other activations) is refused.
        """
        model_type = d.get("model_type")
        ours = dict(d.get("zero2llm") or {})
        known = {f.name for f in fields(cls)}
        unknown = set(ours) - known
        if unknown:
            raise ValueError(f"unknown zero2llm fields {sorted(unknown)}; was it written by a newer version?")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; expected one of {', '.join(HF_MODEL_TYPES)}")
        if model_type == "zero2llm":
            return cls(**ours)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu, the SwiGLU activation)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None
        if rope_type in ROPE_SCALINGS:
            extra = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
            rope_scaling = {"type": rope_type, **extra}
        elif rope_type not in ("default", None):
            raise ValueError(f"rope type {rope_type!r} is not supported (only default, {', '.join(ROPE_SCALINGS)})")
        _check_full_attention(d, model_type, rope)
        if rope_scaling is not None:
            rope_scaling.pop("partial_rotary_factor", None)
        n_heads = d["num_attention_heads"]
        hf = dict(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            hidden_dim=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", ours.get("max_seq_len", 512)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=d.get("rms_norm_eps", 1e-6),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "qwen3_next"),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=_first(d.get("bos_token_id")),
            eos_token_id=_first(d.get("eos_token_id")),
            pad_token_id=_first(d.get("pad_token_id")),
            use_moe=model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next"),
            attention_bias=bool(d.get("attention_bias", False)),
            qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and d.get("qkv_bias", True)),
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            shared_expert_gate=False,
        )
        if hf["attention_bias"] and ours.get("qkv_bias"):  # ours: q/k/v only, exported with a zero o_proj bias
            hf.update(attention_bias=False, qkv_bias=True)
        if hf["use_moe"]:
            if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
                raise ValueError(f"{model_type} with dense layers (mlp_only_layers, decoder_sparse_step) "
                                 "is not supported: every layer here is MoE")
            expert = d["moe_intermediate_size"]
            shared = d.get("shared_expert_intermediate_size", 0) if model_type != "qwen3_moe" else 0
            if shared % expert:
                raise ValueError(f"shared_expert_intermediate_size {shared} is not a multiple of moe_intermediate_size "
                                 f"{expert}; shared experts here are n_shared_experts experts of the routed width")
            hf.update(
                n_routed_experts=d.get("num_experts", d.get("num_local_experts")),  # v5 saves the latter
                num_experts_per_tok=d["num_experts_per_tok"],
                moe_hidden_dim=expert,
                norm_topk_prob=d.get("norm_topk_prob", model_type == "qwen3_next"),
                aux_loss_alpha=d.get("router_aux_loss_coef", 0.001),
                n_shared_experts=shared // expert,
                # transformers' shared experts are gated; ours unless our own export says otherwise
                shared_expert_gate=shared > 0 and ours.get("shared_expert_gate", True),
            )
        ours.update(hf)
        return cls(**ours)


# Fields that change how the model trains, not what its weights compute: a fine-tuning run or a resume may change
# them.
TRAINING_FIELDS = ("dropout", "flash_attn", "aux_loss_alpha")
HF_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_next", "zero2llm")
ROPE_SCALINGS = ("yarn", "llama3", "linear")


def _check_full_attention(d: dict[str, Any], model_type: str, rope: dict[str, Any]) -> None:
    """Refuse configs whose attention is not plain full causal attention over the whole head: sliding windows,
    Qwen3-Next's linear-attention layers, partial RoPE."""
    layer_types = d.get("layer_types")
    if model_type == "qwen3_next" and (not layer_types or "linear_attention" in layer_types):
        raise ValueError("Qwen3-Next's linear-attention (Gated DeltaNet) layers are not implemented; only folders "
                         "whose layer_types are all full_attention load (as zero2llm exports MoE with shared experts "
                         "and qk-norm)")
    window = d.get("sliding_window")
    if layer_types is None and d.get("use_sliding_window") and window:  # transformers 4's rule (Qwen2)
        layer_types = ["sliding_attention" if i >= d.get("max_window_layers", 0) else "full_attention"
                       for i in range(d["num_hidden_layers"])]
    sliding = [i for i, kind in enumerate(layer_types or ()) if kind != "full_attention"]
    if sliding and not (window and window >= d.get("max_position_embeddings", 0)):  # a window the context fits in
        raise ValueError(f"sliding-window attention (sliding_window {window} on layers {sliding}) is not "
                         "implemented; every layer here attends to the whole context")
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25 if model_type == "qwen3_next" else 1))
    if float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported: RoPE here rotates the whole head")


def _first(x: int | list[int] | None) -> int | None:
    """HF allows a list of eos ids; we keep the first (generation_config.json, which travels with the model,
    keeps them all)."""
    return x[0] if isinstance(x, list) else x


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen3_next": "Qwen3NextForCausalLM"}


# Named starting points. vocab_size follows the shipped tokenizer (6400) except "tiny".
# Approximate parameter counts with vocab 6400 (tied embeddings) are in the comments.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: milliseconds per forward on a laptop CPU.
    "tiny": dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64),
    # small made narrower and shallower for short CPU runs (~2.8M): fewer FLOPs a step, so a fixed wall time gives
    # it more steps, which won every model-shape search at 2-10 minute budgets (bench/RESULTS.md).
    "mini": dict(dim=192, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=256),
    # CPU default: trains visibly in minutes (~5.9M params).
    "small": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, max_seq_len=256),
    # MiniMind2-Small-sized (~26M).
    "26m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512),
    # MiniMind2-sized (~104M).
    "104m": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, max_seq_len=512),
    # Dense ~0.49B (GPU).
    "0.5b": dict(dim=1280, n_layers=28, n_heads=20, n_kv_heads=4, max_seq_len=1024),
    # Qwen3-MoE style, loadable by transformers: 4 experts, 2 active, qk-norm, no shared experts
    # (~118M total, ~65M active per token).
    "moe": dict(
        dim=640, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512, qk_norm=True,
        use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0,
    ),
}


def config_from_preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named preset with field overrides (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    bad = set(overrides) - {f.name for f in fields(ModelConfig)}
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(bad)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()
