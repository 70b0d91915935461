"""The decoder: causality, attention paths, padding, KV cache, MoE routing, config, checkpoints, HF parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model import PRESETS, KVCache, ModelConfig, Transformer, config_from_preset, generate, load_balancing_loss

V = 320


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, qk_norm=True)
VARIANTS = {"dense": {}, "qk_norm": dict(qk_norm=True), "moe": MOE}


def ids(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flash", [True, False])
def test_causal_future_tokens_never_change_past_logits(variant: str, flash: bool) -> None:
    model = build(flash_attn=flash, **VARIANTS[variant])
    x = ids()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 7) % V
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_flash_and_math_attention_agree(variant: str) -> None:
    flash = build(flash_attn=True, **VARIANTS[variant])
    math_ = build(flash_attn=False, **VARIANTS[variant])
    math_.load_state_dict(flash.state_dict())
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(flash(x).logits, math_(x).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            flash(x, attention_mask=mask).logits[0, 5:], math_(x, attention_mask=mask).logits[0, 5:], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flash", [True, False])
def test_left_padding_gives_unpadded_logits(variant: str, flash: bool) -> None:
    model = build(flash_attn=flash, **VARIANTS[variant])
    long, short = ids(1, 12, seed=2)[0], ids(1, 7, seed=3)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(5, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone_long, alone_short = model(long[None]).logits[0], model(short[None]).logits[0]
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0], alone_long, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1, 5:], alone_short, atol=1e-5, rtol=0)


def test_attention_mask_shape_is_checked() -> None:
    model = build()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids(2, 8), attention_mask=torch.ones(2, 7))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flash", [True, False])
def test_kv_cache_incremental_equals_full_forward(variant: str, flash: bool) -> None:
    model = build(flash_attn=flash, **VARIANTS[variant])
    x = ids(2, 12)
    cache = KVCache(model.config, batch_size=2, max_len=12)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :5], kv_cache=cache).logits]  # prefill
        steps += [model(x[:, t : t + 1], kv_cache=cache).logits for t in range(5, 8)]  # one token at a time
        steps += [model(x[:, 8:], kv_cache=cache).logits]  # a chunk after cached tokens
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KVCache is full"):
        model(x[:, :1], kv_cache=cache)


def test_kv_cache_buffers_are_preallocated() -> None:
    model = build()
    cache = KVCache(model.config, batch_size=2, max_len=10)
    ptr = cache.k[0].data_ptr()
    with torch.no_grad():
        model(ids(2, 4), kv_cache=cache)
        model(ids(2, 1), kv_cache=cache)
    assert cache.k[0].data_ptr() == ptr and cache.k[0].shape == (2, 2, 10, 16)


def test_logits_to_keep_returns_the_last_positions() -> None:
    model = build()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_to_keep=1).logits, model(x).logits[:, -1:])


# ----------------------------------------------------------------------------- MoE


def moe_layer(**overrides):
    model = build(**{**MOE, **overrides})
    return model.model.layers[0].mlp


def test_moe_routing_topk_and_renormalisation() -> None:
    moe = moe_layer()
    x = torch.randn(10, 64)
    probs, weights, experts = moe.route(x)
    expected = F.softmax(x @ moe.gate.weight.T, dim=-1)
    torch.testing.assert_close(probs, expected)
    top = expected.topk(2, dim=-1)
    assert torch.equal(experts, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))

    raw = moe_layer(norm_topk_prob=False)
    _, weights, _ = raw.route(x)
    torch.testing.assert_close(weights, F.softmax(x @ raw.gate.weight.T, -1).topk(2, -1).values)


def test_moe_dispatch_matches_per_token_reference() -> None:
    moe = moe_layer()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out, _ = moe(x)
        flat = x.reshape(-1, 64)
        _, weights, experts = moe.route(flat)
        ref = torch.stack([
            sum(w * moe.experts[int(e)](tok) for w, e in zip(weights[i], experts[i])) + moe.shared_experts(tok)
            for i, tok in enumerate(flat)
        ])
    torch.testing.assert_close(out.reshape(-1, 64), ref, atol=1e-6, rtol=0)


def test_moe_shared_experts_always_contribute() -> None:
    moe = moe_layer(n_shared_experts=2)
    assert moe.shared_experts.gate_proj.weight.shape[0] == 2 * moe.experts[0].gate_proj.weight.shape[0]
    with torch.no_grad():
        for expert in moe.experts:
            expert.down_proj.weight.zero_()  # routed experts now output 0
        x = torch.randn(1, 4, 64)
        out, _ = moe(x)
    torch.testing.assert_close(out, moe.shared_experts(x))
    assert out.abs().sum() > 0


def test_aux_loss_hand_computed_case() -> None:
    # 4 tokens, 2 experts, top-1. Tokens 0-2 pick expert 0, token 3 picks expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = probs.topk(1, dim=-1).indices
    f = torch.tensor([3 / 4, 1 / 4])
    P = probs.mean(0)  # [0.65, 0.35]
    expected = 2 * (f * P).sum()  # = 2 * (0.4875 + 0.0875) = 1.15
    assert math.isclose(float(expected), 1.15, rel_tol=1e-6)
    torch.testing.assert_close(load_balancing_loss(probs, experts, 2, n_groups=1), expected)
    # Sequence-level: two sequences of two tokens, each balanced on its own.
    seq0 = 2 * (torch.tensor([1.0, 0.0]) * probs[:2].mean(0)).sum()
    seq1 = 2 * (torch.tensor([0.5, 0.5]) * probs[2:].mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, experts, 2, n_groups=2), (seq0 + seq1) / 2)
    # Padding (valid = 0) is left out of both f and P.
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(
        load_balancing_loss(probs, experts, 2, n_groups=1, valid=valid), 2 * (torch.tensor([1.0, 0.0]) * probs[:3].mean(0)).sum()
    )
    # Perfect balance gives exactly 1.
    uniform = torch.full((4, 2), 0.5)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([[0], [1], [0], [1]]), 2, 1), torch.tensor(1.0))


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_returned_in_training_and_zero_in_eval(seq_aux: bool) -> None:
    model = build(aux_loss_alpha=0.1, seq_aux=seq_aux, **{k: v for k, v in MOE.items()})
    x = ids()
    model.train()
    out = model(x)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    # Summed over layers, each at least alpha * 1 (the balanced minimum) ... at most alpha * E.
    assert 0.1 * 2 - 1e-6 <= out.aux_loss.item() <= 0.1 * 2 * 4
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model(x).aux_loss.item() == 0.0
    assert build().train()(x).aux_loss.item() == 0.0  # dense


def test_aux_loss_is_not_stored_on_modules() -> None:
    model = build(**MOE).train()
    model(ids())
    for module in model.modules():
        for value in vars(module).values():
            assert not (isinstance(value, torch.Tensor) and value.requires_grad), "a graph is kept alive"


def test_every_expert_gets_a_gradient_even_without_tokens() -> None:
    model = build(**MOE).train()
    out = model(ids(1, 1))  # one token visits 2 of the 4 experts
    (out.logits.sum() + out.aux_loss).backward()
    for expert in model.model.layers[0].mlp.experts:
        assert expert.gate_proj.weight.grad is not None


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
        (dict(dim=60, n_heads=4, head_dim=15), "even for RoPE"),
        (dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size must be > 0"),
        (dict(eos_token_id=V), "eos_token_id"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "one of yarn, llama3, linear"),
        (dict(rope_scaling={"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}), "low_freq_factor"),
        (dict(attention_bias=True, qkv_bias=True), "qkv_bias is implied by attention_bias"),
        (dict(use_moe=True, mlp_bias=True), "mlp_bias is for dense models"),
        (dict(use_moe=True, n_shared_experts=0, shared_expert_gate=True), "shared_expert_gate needs"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
    ],
)
def test_config_validate_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides).validate()


def test_config_derived_sizes() -> None:
    c = ModelConfig(dim=512, n_heads=8, multiple_of=64)
    assert c.head_dim == 64 and c.hidden_dim == 1408 and c.moe_hidden_dim == 1408  # Llama rule: 64*ceil(1365/64)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_round_trip_through_hf_json(name: str) -> None:
    c = config_from_preset(name)
    d = json.loads(json.dumps(c.to_hf_dict()))
    assert ModelConfig.from_hf_dict(d) == c


def test_config_hf_model_types_and_round_trip() -> None:
    assert tiny().to_hf_dict()["model_type"] == "llama"
    assert tiny(qk_norm=True).to_hf_dict()["model_type"] == "qwen3"
    assert tiny(**{**MOE, "n_shared_experts": 0}).to_hf_dict()["model_type"] == "qwen3_moe"
    assert tiny(**MOE).to_hf_dict()["model_type"] == "qwen3_next"
    assert tiny(use_moe=True, n_shared_experts=0).to_hf_dict()["model_type"] == "qwen2_moe"
    assert tiny(qkv_bias=True).to_hf_dict()["model_type"] == "qwen2"
    assert tiny(attention_bias=True, mlp_bias=True).to_hf_dict()["model_type"] == "llama"
    # nothing in transformers computes these
    for c in (tiny(qk_norm=True, mlp_bias=True), tiny(use_moe=True, attention_bias=True), tiny(n_heads=3, n_kv_heads=1, head_dim=16)):
        assert c.to_hf_dict()["model_type"] == "zero2llm"
    c = tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, dropout=0.1, seq_aux=False)
    d = c.to_hf_dict()
    assert d["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32}
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == c
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})


def test_readme_presets_table_is_what_the_code_computes() -> None:
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("model_sizes", ROOT / "scripts" / "model_sizes.py")
    model_sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_sizes)
    table = model_sizes.table()
    assert table in (ROOT / "README.md").read_text()
    assert "| Qwen2.5-7B (`--init_from`) | 3584 × 28 | 28 / 4 | 152,064 | 7,615.6 M |" in table  # the published 7.6B


def test_config_from_preset_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        config_from_preset("tiny", n_layer=3)


def test_num_params_and_flops() -> None:
    model = build()
    c = model.config
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * c.dim
    n_active = model.num_params(exclude_embeddings=True) + V * c.dim  # tied lm_head still costs a matmul
    assert model.estimate_flops_per_token(32) == 6 * n_active + 6 * c.n_layers * c.n_heads * c.head_dim * 32  # causal


def test_out_projections_use_scaled_init() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(dim=256, n_layers=8, n_heads=4, n_kv_heads=2))
    std_q = model.model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = model.model.layers[0].self_attn.o_proj.weight.std().item()
    assert math.isclose(std_q, 0.02, rel_tol=0.05)
    assert math.isclose(std_o, 0.02 / math.sqrt(16), rel_tol=0.05)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ----------------------------------------------------------------------------- checkpoints


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(tmp_path, variant: str) -> None:
    model = build(**VARIANTS[variant])
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: omitted, as HF does
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = ids()
    torch.testing.assert_close(logits_of(loaded, x), logits_of(model, x), atol=0, rtol=0)


def test_from_pretrained_dtype(tmp_path) -> None:
    build().save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path, dtype="bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model(ids()).logits.dtype == torch.bfloat16


def test_from_pretrained_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        Transformer.from_pretrained(tmp_path / "nope")
    build().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read the weights, the file is truncated or corrupt"):
        Transformer.from_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: file missing"):
        Transformer.from_pretrained(tmp_path)

    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 128
    config["zero2llm"]["dim"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(320, 64\) in the checkpoint but \(320, 128\)"):
        Transformer.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        Transformer.from_pretrained(tmp_path)


def test_from_pretrained_reports_missing_tensors(tmp_path) -> None:
    build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing model\.layers\.2\..*different models"):
        Transformer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- transformers parity

LLAMA3_ROPE = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
SHARED = dict(use_moe=True, n_shared_experts=1)
# name: (our config overrides, the transformers class its export loads as)
HF_CASES = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama_untied": (dict(tie_word_embeddings=False), "LlamaForCausalLM"),
    "llama_bias": (dict(attention_bias=True, mlp_bias=True), "LlamaForCausalLM"),
    "llama_qkv_mlp_bias": (dict(qkv_bias=True, mlp_bias=True), "LlamaForCausalLM"),  # + a zero o_proj bias
    "qwen2": (dict(qkv_bias=True, tie_word_embeddings=False), "Qwen2ForCausalLM"),
    "qwen3": (dict(qk_norm=True), "Qwen3ForCausalLM"),
    "qwen3_qkv_bias": (dict(qk_norm=True, qkv_bias=True), "Qwen3ForCausalLM"),
    "qwen3_moe": (dict(qk_norm=True, use_moe=True, n_shared_experts=0), "Qwen3MoeForCausalLM"),
    "qwen3_moe_no_renorm": (dict(qk_norm=True, use_moe=True, n_shared_experts=0, norm_topk_prob=False), "Qwen3MoeForCausalLM"),
    "qwen2_moe_shared": (SHARED, "Qwen2MoeForCausalLM"),  # ungated: zero gate, doubled down_proj
    "qwen2_moe_shared_gated": (dict(**SHARED, shared_expert_gate=True, qkv_bias=True), "Qwen2MoeForCausalLM"),
    "qwen2_moe_no_shared": (dict(use_moe=True, n_shared_experts=0, norm_topk_prob=False), "Qwen2MoeForCausalLM"),
    "qwen3_next_shared": (dict(use_moe=True, qk_norm=True, n_shared_experts=2), "Qwen3NextForCausalLM"),
    "qwen3_next_shared_gated_bias": (dict(**SHARED, qk_norm=True, shared_expert_gate=True, attention_bias=True),
                                     "Qwen3NextForCausalLM"),
    "llama_yarn": (
        dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
        "LlamaForCausalLM",
    ),
    "llama3_rope": (dict(rope_scaling=LLAMA3_ROPE, rope_theta=500.0), "LlamaForCausalLM"),
    "linear_rope": (dict(rope_scaling={"type": "linear", "factor": 2.0}, qkv_bias=True), "Qwen2ForCausalLM"),
}


def build_random(seed: int = 0, **overrides) -> Transformer:
    """A model whose norm gains and biases are random too (at init they are 1 and 0, which would hide a
    mis-mapped norm or bias)."""
    model = build(seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((0.1 if name.endswith(".bias") else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model


def greedy(model, x: torch.Tensor, n: int = 12) -> torch.Tensor:
    """n greedy tokens from ours (KV-cached generate) or a transformers model (its generate)."""
    if isinstance(model, Transformer):
        return torch.stack(list(generate(model, x, n, temperature=0)), dim=1)
    out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, x.shape[1]:]


@pytest.mark.parametrize("case", HF_CASES)
def test_export_matches_transformers_both_ways(tmp_path, case: str) -> None:
    """Ours -> export -> transformers: equal logits (fp32, 1e-4) and greedy tokens; the folder transformers saves
    again -> ours: equal logits, and the same config."""
    transformers = pytest.importorskip("transformers")
    overrides, cls_name = HF_CASES[case]
    model = build_random(**overrides)
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(hf).__name__ == cls_name
    x = ids(2, 40)  # longer than the scaled RoPEs' original 16 positions
    torch.testing.assert_close(logits_of(hf, x), logits_of(model, x), atol=1e-4, rtol=0)
    assert torch.equal(greedy(hf, x[:1, :8]), greedy(model, x[:1, :8]))
    if "rope" in case or "yarn" in case:  # the scaling must actually change something
        plain = build_random(**{**overrides, "rope_scaling": None})
        assert not torch.allclose(logits_of(plain, x), logits_of(model, x), atol=1e-3)
    hf.save_pretrained(tmp_path / "hf")
    back = Transformer.from_pretrained(tmp_path / "hf").eval()
    assert back.config == model.config
    torch.testing.assert_close(logits_of(back, x), logits_of(model, x), atol=1e-5, rtol=0)


def hf_config(arch: str, transformers, **extra):
    """A tiny random config of a transformers architecture, as the Hub's checkpoints of it are laid out."""
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "llama_bias": lambda: transformers.LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        "llama3_rope": lambda: transformers.LlamaConfig(**common, rope_parameters={"rope_theta": 500.0, **{
            ("rope_type" if k == "type" else k): v for k, v in LLAMA3_ROPE.items()}}),
        "qwen2": lambda: transformers.Qwen2Config(**{**common, "tie_word_embeddings": True}),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=64),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, **moe, head_dim=16, norm_topk_prob=True),
        "qwen3_next": lambda: transformers.Qwen3NextConfig(
            **common, **moe, head_dim=16, shared_expert_intermediate_size=32, layer_types=["full_attention"] * 2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}),
    }
    config = configs[arch]()
    for k, v in extra.items():
        setattr(config, k, v)
    return config


def random_hf_model(arch: str, transformers, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(arch, transformers)).eval()
    with torch.no_grad():  # transformers inits biases at 0 and norms at 1 (Qwen3-Next's at 0): randomise them
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("arch", ["llama", "llama_bias", "llama3_rope", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_models_made_by_transformers_import_with_equal_logits(tmp_path, arch: str) -> None:
    """The other direction: a random model that transformers built and saved loads into ours: equal logits
    and greedy tokens. Biases and a real (Qwen2-MoE) shared-expert gate come along."""
    transformers = pytest.importorskip("transformers")
    hf = random_hf_model(arch, transformers)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    c = ours.config
    assert c.qk_norm == (arch in ("qwen3", "qwen3_moe")) and c.tie_word_embeddings == (arch == "qwen2")
    assert (c.qkv_bias, c.attention_bias, c.mlp_bias) == (arch in ("qwen2", "qwen2_moe"), arch == "llama_bias",
                                                          arch == "llama_bias")
    assert c.shared_expert_gate == (arch == "qwen2_moe")
    assert c.use_moe == arch.endswith("moe") and (not c.use_moe or c.n_shared_experts == (arch == "qwen2_moe") * 2)
    x = ids(2, 40)
    torch.testing.assert_close(logits_of(ours, x), logits_of(hf, x), atol=1e-4, rtol=0)
    assert torch.equal(greedy(ours, x[:1, :8]), greedy(hf, x[:1, :8]))
    ours.save_pretrained(tmp_path / "again")  # and out again, as the same class
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == hf.config.architectures


def test_sharded_bf16_checkpoint_loads(tmp_path) -> None:
    """Hub checkpoints are usually bf16 and split into shards with model.safetensors.index.json."""
    transformers = pytest.importorskip("transformers")
    hf = random_hf_model("qwen2", transformers).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) >= 2
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.lm_head.weight.dtype == torch.float32  # fp32 master weights for training
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = ids(2, 24)
    torch.testing.assert_close(logits_of(ours, x), logits_of(reference, x), atol=1e-4, rtol=0)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: file missing"):
        Transformer.from_pretrained(tmp_path)


def test_generation_config_travels(tmp_path) -> None:
    """Several eos ids (Llama 3.1 Instruct, Qwen2.5 Instruct) and sampling defaults survive import and export."""
    build().save_pretrained(tmp_path / "a")
    gen = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "temperature": 0.7, "top_p": 0.8}
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps(gen))
    Transformer.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text()) == gen


@pytest.mark.parametrize("arch, changes, message", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, layer_types=["full_attention", "sliding_attention"]),
     r"sliding-window attention \(sliding_window 16 on layers \[1\]\)"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None),
     r"sliding_window 16 on layers \[0, 1\]"),  # transformers 4's configs: no layer_types
    ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"]), "linear-attention"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("qwen3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope type 'dynamic'"),
])
def test_unsupported_hf_architectures_are_refused(tmp_path, arch: str, changes: dict, message: str) -> None:
    transformers = pytest.importorskip("transformers")
    random_hf_model(arch, transformers).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        Transformer.from_pretrained(tmp_path)


def test_sliding_window_fields_that_change_nothing_are_accepted(tmp_path) -> None:
    """Qwen2.5's configs carry sliding-window fields that are off, or windows no shorter than the context."""
    transformers = pytest.importorskip("transformers")
    random_hf_model("qwen2", transformers).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for changes in (dict(use_sliding_window=False, sliding_window=16, max_window_layers=0, layer_types=None),
                    dict(use_sliding_window=True, sliding_window=16, max_window_layers=2, layer_types=None),
                    dict(use_sliding_window=True, sliding_window=64, layer_types=["sliding_attention"] * 2)):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
        Transformer.from_pretrained(tmp_path)


def test_weights_the_model_would_drop_are_refused(tmp_path) -> None:
    """A real Qwen3-Next's attention output gate, or a non-zero o_proj bias where config.json's zero2llm block says
    q/k/v only: refused rather than silently computing something else."""
    transformers = pytest.importorskip("transformers")
    random_hf_model("qwen3_next", transformers).save_pretrained(tmp_path / "next")
    with pytest.raises(ValueError, match="non-zero attention output gate"):
        Transformer.from_pretrained(tmp_path / "next")
    build(qkv_bias=True, mlp_bias=True).save_pretrained(tmp_path / "bias")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bias")
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "bias")
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.o_proj\.bias is not zero"):
        Transformer.from_pretrained(tmp_path / "bias")
