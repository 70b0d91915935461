"""The optimised code paths compute what the plain ones do (speed itself is measured in bench/, never here)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_metrics, train_args
from trainer import distributed, objectives
from trainer.parallel import can_compile, compile_blocks
from trainer.flops import gpu_datasheet_peak, measure_matmul_flops, peak_flops
from trainer.objectives import IGNORE_INDEX, token_cross_entropy


# ----------------------------------------------------------------------------- dtype auto


@pytest.mark.parametrize("probes, cpuinfo, expected", [
    ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, "flags : avx512f", torch.bfloat16),
    ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, "flags : avx512f", torch.bfloat16),
    ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, "flags : avx2 avx512f", torch.float32),
    ({}, "flags : fpu avx512_bf16 amx_tile", torch.bfloat16),           # a torch without the probes
    ({}, "Features : fp asimd bf16 i8mm", torch.bfloat16),              # Arm (Graviton 3)
    ({}, "Features : fp asimd", torch.float32),
])
def test_auto_dtype_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, tmp_path, probes, cpuinfo, expected):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if name in probes:
            monkeypatch.setattr(torch.cpu, name, lambda v=probes[name]: v, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, name, raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo + "\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    assert distributed.resolve_dtype("auto", torch.device("cpu")) == expected
    assert distributed.resolve_dtype("float32", torch.device("cpu")) == torch.float32


# ----------------------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_f_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(objectives, "CE_CHUNK_ROWS", 7)  # chunks that do not divide the 3 x 10 positions
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 10, 50, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, :4] = labels[2, 9] = IGNORE_INDEX
    weights = torch.rand(3, 10, generator=g)  # a non-uniform upstream gradient

    a = logits.clone().requires_grad_()
    ref = F.cross_entropy(a.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    (ref.view(3, 10) * weights).sum().backward()
    b = logits.clone().requires_grad_()
    ours = token_cross_entropy(b, labels)
    (ours * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (3, 10)
    torch.testing.assert_close(ours, ref.view(3, 10), atol=1e-5, rtol=1e-5)
    assert ours[0, :4].eq(0).all() and b.grad[0, :4].eq(0).all()
    assert b.grad.dtype == dtype
    torch.testing.assert_close(b.grad.float(), a.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                               rtol=0 if dtype == torch.float32 else 1e-2)


def test_chunked_cross_entropy_without_grad_keeps_no_gradient_buffer():
    logits = torch.randn(4, 9)
    with torch.no_grad():
        out = token_cross_entropy(logits, torch.tensor([1, 2, IGNORE_INDEX, 8]))
    torch.testing.assert_close(out[[0, 1, 3]], F.cross_entropy(logits[[0, 1, 3]], torch.tensor([1, 2, 8]),
                                                               reduction="none"))
    assert out[2] == 0 and out.grad_fn is None


# ----------------------------------------------------------------------------- tokens/s and MFU


def test_mfu_peak_sources(monkeypatch):
    assert peak_flops(torch.device("cpu"), torch.float32, given_tflops=2.5) == 2.5e12
    assert gpu_datasheet_peak(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == 989e12  # the datasheet, not a measurement
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    assert gpu_datasheet_peak(torch.device("cuda"), torch.bfloat16) is None  # unknown: peak_flops would measure
    rng = torch.get_rng_state()
    measured = measure_matmul_flops(torch.device("cpu"), torch.float32, n=512, reps=2)
    assert 1e9 < measured < 1e15
    assert torch.equal(torch.get_rng_state(), rng)  # a training run's seeded draws (dropout) must not depend on it


def test_logged_tokens_are_real_tokens_and_mfu_is_logged(corpus, tmp_path, base_model, tok):
    """Pretraining rows are packed (every token is real); SFT batches are padded and the padding is not counted."""
    import train
    from data import SFTDataset
    from trainer.sampler import ResumableBatchSampler

    run = tmp_path / "pre"
    train.main(train_args(corpus, run, "--max_steps", "3", "--eval_interval", "0", "--no-save_last"))
    logs = [r for r in read_metrics(run) if "tokens_per_sec" in r]
    assert [r["tokens_seen"] for r in logs] == [4 * 32 * s for s in (1, 2, 3)]
    assert all(0 < r["mfu"] < 1 for r in logs)

    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join((ROOT / "dataset" / "sft.jsonl").read_text().splitlines()[:40]) + "\n")
    sft = tmp_path / "sft"
    train.main(["--mode", "sft", "--init_from", str(base_model), "--data_path", str(chats), "--val_data_path",
                str(chats), "--out_dir", str(sft), "--max_steps", "2", "--batch_size", "8", "--eval_interval", "0",
                "--no-save_last", "--device", "cpu", "--dtype", "float32", "--log_interval", "1"])
    seen = [r["tokens_seen"] for r in read_metrics(sft) if "tokens_seen" in r]
    lengths = SFTDataset(chats, tok, 64).lengths
    batches = list(ResumableBatchSampler(len(lengths), 8, seed=1337, lengths=lengths, group_rows=8))[:2]
    real = [int(lengths[rows].sum()) for rows in batches]
    padded = [int(lengths[rows].max()) * len(rows) for rows in batches]
    assert seen == [real[0], real[0] + real[1]]
    assert real != padded  # the batches do hold padding, so counting it would fail the line above


# ----------------------------------------------------------------------------- MoE dispatch


def moe_model(device: str = "cpu"):
    from model import Transformer
    from model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64,
                      qk_norm=True, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    return Transformer(cfg).to(device).train()


def moe_loss_and_grads(model, x: torch.Tensor, grouped: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for layer in model.model.layers:
        layer.mlp.grouped_mm = grouped
    model.zero_grad()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model(x)
        loss = token_cross_entropy(out.logits, x).mean() + out.aux_loss
    loss.backward()
    return out.logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def check_grouped_equals_looped(device: str) -> None:
    model = moe_model(device)
    x = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(1)).to(device)
    ref_logits, ref_grads = moe_loss_and_grads(model, x, grouped=False)
    logits, grads = moe_loss_and_grads(model, x, grouped=True)
    torch.testing.assert_close(logits, ref_logits, atol=2e-2, rtol=2e-2)  # bf16 matmuls, other summation order
    expert_grads = [n for n in grads if ".experts." in n]
    assert len(expert_grads) == 2 * 4 * 3
    for name in grads:
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        assert (grads[name] - ref_grads[name]).abs().max() / scale < 3e-2, name


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")
def test_moe_grouped_gemm_equals_the_expert_loop_on_cpu():
    """torch._grouped_mm also runs (bf16) on CPU, so the GPU path's math is checked here against the loop."""
    check_grouped_equals_looped("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_picks_grouped_gemm_on_cuda_and_it_equals_the_loop():
    model = moe_model("cuda")
    moe = model.model.layers[0].mlp
    flat = torch.randn(8, 64, device="cuda")
    assert moe._use_grouped_mm(flat, torch.bfloat16) == (torch.cuda.get_device_capability() >= (8, 0))
    assert not moe._use_grouped_mm(flat, torch.float32)
    check_grouped_equals_looped("cuda")


def expert_rows_seen(model) -> list[int]:
    """Rows each expert of the first layer is called on, appended as the model runs."""
    rows: list[int] = []
    for expert in model.model.layers[0].mlp.experts:
        expert.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    return rows


def test_cpu_expert_padding_keeps_outputs_and_gradients(monkeypatch):
    """In bf16 on CPU, expert slices are padded to CPU_EXPERT_ROWS rows and the padding changes nothing: the same
    outputs and gradients as unpadded slices. fp32 is never padded (it stays equal to transformers bit for bit)."""
    from model import model as model_module

    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    assignments = x.numel() * 2  # top-2
    results = []
    for multiple in (1, 64):
        monkeypatch.setattr(model_module, "CPU_EXPERT_ROWS", multiple)
        m = moe_model()
        rows = expert_rows_seen(m)
        results.append(moe_loss_and_grads(m, x, grouped=False))  # bf16 autocast
        assert all(n % multiple == 0 for n in rows)
        assert (sum(rows) > assignments) == (multiple == 64)  # 48 assignments over 4 experts: 4 x 64 rows padded
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)

    m = moe_model()
    rows = expert_rows_seen(m)
    m(x)  # fp32
    assert sum(rows) == assignments


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="Inductor needs a C++ compiler")
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """compile_blocks changes how a step runs, not what it computes (bf16 autocast, as the CPU recipe runs)."""
    from model import Transformer
    from model.config import ModelConfig
    from trainer.objectives import CausalLMObjective

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=32)
    eager, compiled = Transformer(cfg), Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, torch.device("cpu"))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    x = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    results = []
    for model in (eager, compiled):
        for step in range(2):  # the second call runs the cached graph
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = CausalLMObjective()(model, batch)[0] / x[:, 1:].numel()
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-3, rtol=2e-3)
    for name, grad in results[0][1].items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (results[1][1][name] - grad).abs().max() / scale < 3e-2, name


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("matvec", [True, False])  # AMX CPUs' path, others' (CPULinear.matvec), whatever this CPU is
def test_linear_single_row_matrix_vector_path_equals_f_linear(monkeypatch, dtype, bias, matvec):
    from model.cpu_linear import CPULinear

    monkeypatch.setattr(CPULinear, "matvec", matvec)
    real_mv, real_addmv, calls = torch.mv, torch.addmv, []
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("mv") or real_mv(*a))
    monkeypatch.setattr(torch, "addmv", lambda *a: calls.append("addmv") or real_addmv(*a))
    torch.manual_seed(0)
    layer = CPULinear(48, 80, bias=bias).to(dtype)
    for shape in ((1, 1, 48), (1, 48), (2, 1, 48)):  # one row (mv when matvec), and more rows (F.linear)
        x = torch.randn(shape).to(dtype)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        calls.clear()
        y = layer(x)
        assert calls == (["addmv" if bias else "mv"] if matvec and math.prod(shape[:-1]) == 1 else [])
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), **tol)
        assert y.shape == (*shape[:-1], 80)


needs_onednn_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="packed weights need PyTorch's oneDNN bf16 kernels (x86)")


def spy_packing(monkeypatch) -> list[str]:
    """Force CPULinear's packed path on (whatever this CPU's default) and record every layer that takes it."""
    from model.cpu_linear import CPULinear

    monkeypatch.setattr(CPULinear, "pack", True)
    monkeypatch.setattr(CPULinear, "pack_max_rows", None)
    monkeypatch.setattr(CPULinear, "matvec", False)
    real, calls = CPULinear.packed_product, []
    monkeypatch.setattr(CPULinear, "packed_product",
                        lambda self, x, *others: calls.append(self) or real(self, x, *others))
    return calls


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_packed_bf16_weights_give_f_linear_bit_for_bit(monkeypatch, bias):
    """bf16 products of frozen weights without gradients run on the packed weight and equal F.linear exactly, from
    decoding's one row to a prefill's hundreds, also under autocast from fp32 weights (DPO's reference); fp32,
    weights under PACK_MIN_WEIGHT, trainable weights, products with gradients and modules with pack False keep
    F.linear."""
    from model.cpu_linear import PACK_MIN_WEIGHT, CPULinear

    calls = spy_packing(monkeypatch)
    torch.manual_seed(0)

    def frozen(*shape: int, dtype: torch.dtype = torch.bfloat16) -> CPULinear:
        return CPULinear(*shape, bias=bias).to(dtype).requires_grad_(False)

    layer = frozen(128, 160)
    assert layer.weight.numel() >= PACK_MIN_WEIGHT
    with torch.no_grad():
        for shape in ((1, 1, 128), (3, 1, 128), (2, 37, 128), (1, 600, 128)):
            x = torch.randn(shape).to(torch.bfloat16)
            calls.clear()
            y = layer(x)
            assert calls == [layer] and y.shape == (*shape[:-1], 160)
            assert torch.equal(y, F.linear(x, layer.weight, layer.bias))

        fp32 = frozen(128, 160, dtype=torch.float32)
        x = torch.randn(2, 5, 128)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls.clear()
            y = fp32(x)
            assert calls == [fp32] and y.dtype == torch.bfloat16
            assert torch.equal(y, F.linear(x, fp32.weight, fp32.bias))
        calls.clear()
        off = frozen(128, 160)
        off.pack = False
        trainable = CPULinear(128, 160, bias=bias).to(torch.bfloat16)
        for module, x in ((fp32, torch.randn(1, 128)), (frozen(64, 64), torch.randn(1, 64).bfloat16()),
                          (off, torch.randn(1, 128).bfloat16()), (trainable, torch.randn(1, 128).bfloat16())):
            torch.testing.assert_close(module(x), F.linear(x, module.weight, module.bias), atol=0, rtol=0)
        assert calls == []
    lora_like = frozen(128, 160)  # a frozen layer inside a graph that needs gradients (LoRA's base model)
    x = torch.randn(1, 128).to(torch.bfloat16).requires_grad_()
    y = lora_like(x)
    assert calls == [] and y.requires_grad
    y.float().sum().backward()
    assert x.grad is not None


@needs_onednn_bf16
def test_amx_cpus_pack_only_decoding_rows(monkeypatch):
    """Where pack_max_rows is set (CPUs with AMX, whose oneDNN changes kernels for a packed weight at a few dozen
    rows), products of up to that many rows take the packed weight and larger ones F.linear, alone or stacked."""
    from model.cpu_linear import PACK_MAX_ROWS_AMX, CPULinear, project

    calls = spy_packing(monkeypatch)
    monkeypatch.setattr(CPULinear, "pack_max_rows", PACK_MAX_ROWS_AMX)
    torch.manual_seed(0)
    q, k = (CPULinear(128, 160, bias=False).to(torch.bfloat16).requires_grad_(False) for _ in range(2))
    with torch.no_grad():
        for rows, packed in ((1, True), (PACK_MAX_ROWS_AMX, True), (PACK_MAX_ROWS_AMX + 1, False), (600, False)):
            x = torch.randn(1, rows, 128).to(torch.bfloat16)
            calls.clear()
            y, = project(x, q)
            ys = project(x, q, k)
            assert calls == ([q, q] if packed else [])
            assert torch.equal(y, F.linear(x, q.weight)), rows
            assert torch.equal(ys[1], F.linear(x, k.weight)), rows


@needs_onednn_bf16
def test_packed_weights_follow_every_change_of_the_weights(monkeypatch):
    """A frozen weight's packed copy is rebuilt after a load, an in-place edit and a dtype round trip; a trained
    weight is never packed, since fused AdamW rewrites it without bumping its version (a generation between steps,
    as GRPO's, must see the new weights); a layer holding a copy still deep-copies and pickles."""
    import copy
    import pickle

    from model.cpu_linear import CPULinear

    calls = spy_packing(monkeypatch)
    torch.manual_seed(0)
    layer = CPULinear(128, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 128).to(torch.bfloat16)

    def check() -> torch.Tensor:
        with torch.inference_mode():
            y = layer(x)
        assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
        return y

    before = check()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    version = layer.weight._version
    layer(x).float().pow(2).sum().backward()
    optimizer.step()
    assert layer.weight._version == version  # what makes packing a trained weight unsafe
    assert not torch.equal(check(), before) and calls == []

    layer.requires_grad_(False)
    check()
    assert calls == [layer]
    layer.load_state_dict(CPULinear(128, 160, bias=True).to(torch.bfloat16).state_dict())
    check()
    with torch.no_grad():
        layer.weight.mul_(0.5)
        layer.bias.add_(1.0)
    check()
    layer.float()
    layer.bfloat16()
    check()
    twin = copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


@needs_onednn_bf16
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_stacked_packed_projections_give_the_same_logits_and_tokens(monkeypatch, qkv_bias):
    """Frozen, without gradients in bf16, q/k/v and gate/up each run as one call on their stacked packed weights
    (project): a model's logits and greedy tokens are those of F.linear bit for bit, with biases (Qwen2) or not."""
    from model import Transformer, generate
    from model.config import ModelConfig
    from model.cpu_linear import CPULinear

    calls = spy_packing(monkeypatch)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                    max_seq_len=64, qkv_bias=qkv_bias)).to(torch.bfloat16).eval().requires_grad_(False)
    prompt = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed_logits = model(prompt).logits
    packed_tokens = torch.stack(list(generate(model, prompt, 20, temperature=0)), dim=1)
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    assert {names[layer] for layer in calls} == {"q_proj", "o_proj", "gate_proj", "down_proj", "lm_head"}
    monkeypatch.setattr(CPULinear, "pack", False)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, packed_logits)
    assert torch.equal(torch.stack(list(generate(model, prompt, 20, temperature=0)), dim=1), packed_tokens)
    assert calls == []


def frozen_bf16_model(**overrides):
    """A small model as eval_model loads one (bf16, eval mode, frozen), its norm weights moved off 1 so that a norm
    whose weight were left out or applied in another order would show."""
    from model import Transformer
    from model.config import ModelConfig

    torch.manual_seed(0)
    config = dict(vocab_size=320, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64)
    model = Transformer(ModelConfig(**{**config, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


@needs_onednn_bf16
@pytest.mark.parametrize("overrides", [
    {}, dict(n_kv_heads=4), dict(qkv_bias=True), dict(attention_bias=True, mlp_bias=True), dict(head_dim=48),
    dict(tie_word_embeddings=False, rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
], ids=["gqa", "mha", "qkv_bias", "all_biases", "head_dim", "untied_yarn"])
@pytest.mark.parametrize("batch, padded", [(1, False), (3, False), (3, True)], ids=["one_row", "rows", "left_padded"])
def test_cpu_decode_step_equals_the_models_one_token_forward_bit_for_bit(monkeypatch, overrides, batch, padded):
    """model/decode.py's written-out step gives Transformer.forward's logits for one new token a row exactly, and
    writes the same keys and values into the cache, step after step, for every kind of model it takes, with
    left-padded rows too."""
    from model import KVCache
    from model.decode import CPUDecodeStep

    spy_packing(monkeypatch)  # the packed products on, whatever this CPU's default
    model = frozen_bf16_model(**overrides)
    prompt = torch.randint(3, 320, (batch, 6), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(3, 320, (10, batch), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(batch, 16, dtype=torch.long)
    if padded:
        mask[1, :3] = mask[2, :1] = 0
    with torch.inference_mode():
        step = CPUDecodeStep.build(model, batch)
        assert step is not None
        forward, written = (KVCache(model.config, batch, 20, dtype=torch.bfloat16) for _ in range(2))
        for cache in (forward, written):
            model(prompt, attention_mask=mask[:, :6] if padded else None, kv_cache=cache)
        for token in tokens:
            seen = mask[:, :forward.length + 1] if padded else None
            expected = model(token[:, None], attention_mask=seen, kv_cache=forward).logits[:, -1]
            assert torch.equal(step(token, written, attention_mask=seen), expected)
        assert written.length == forward.length == 16
        for layer in range(model.config.n_layers):
            assert torch.equal(written.k[layer], forward.k[layer]) and torch.equal(written.v[layer], forward.v[layer])


@needs_onednn_bf16
def test_generate_decodes_through_the_cpu_step_where_it_applies(monkeypatch):
    """generate() takes the written-out step for a frozen bf16 model, with the tokens the model's forward gives,
    padded rows too; --compile, and every model the step does not take, decode through the forward."""
    from model import generate
    from model.decode import CPUDecodeStep
    from model.cpu_linear import CPULinear

    spy_packing(monkeypatch)
    real_call, steps = CPUDecodeStep.__call__, []
    monkeypatch.setattr(CPUDecodeStep, "__call__", lambda self, *a, **k: steps.append(1) or real_call(self, *a, **k))
    model = frozen_bf16_model()
    prompt = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(1))

    def tokens(m=model, **kwargs) -> torch.Tensor:
        steps.clear()
        return torch.stack(list(generate(m, prompt, 12, temperature=0, **kwargs)), dim=1)

    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    fast, padded = tokens(), tokens(attention_mask=mask)
    assert len(steps) == 11  # every token after the prefill's
    real_build = CPUDecodeStep.build
    monkeypatch.setattr(CPUDecodeStep, "build", lambda *a: None)
    assert torch.equal(tokens(), fast) and torch.equal(tokens(attention_mask=mask), padded) and steps == []
    monkeypatch.setattr(CPUDecodeStep, "build", real_build)

    with torch.inference_mode():
        assert CPUDecodeStep.build(model, 2) is not None
        for refused in (frozen_bf16_model(use_moe=True), frozen_bf16_model(qk_norm=True),
                        frozen_bf16_model(flash_attn=False), frozen_bf16_model().float(), frozen_bf16_model().train()):
            assert CPUDecodeStep.build(refused, 2) is None
        trainable = frozen_bf16_model()
        trainable.model.layers[1].mlp.down_proj.weight.requires_grad_(True)  # GRPO's policy: weights that change
        assert CPUDecodeStep.build(trainable, 2) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert CPUDecodeStep.build(model, 2) is None
        monkeypatch.setattr(CPULinear, "pack_max_rows", 2)  # a CPU with AMX: packed products of at most 2 rows
        assert CPUDecodeStep.build(model, 3) is None and CPUDecodeStep.build(model, 2) is not None
        monkeypatch.setattr(CPULinear, "pack", False)  # a CPU without oneDNN's bf16 kernels
        assert CPUDecodeStep.build(model, 1) is None
    assert torch.equal(tokens(), fast) and steps == []


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN (x86)")
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_products_with_gradients_on_onednn_give_f_linears_values_and_gradients(monkeypatch, bias):
    """With onednn_fp32 on (AMD CPUs with AVX-512), an fp32 product with gradients runs through oneDNN: its output
    and the gradients of x, weight and bias are F.linear's up to fp32 rounding, also for a frozen weight (LoRA's base
    layers) and a gradient that is not contiguous; without gradients, under autocast and in bf16 it is not used."""
    from model.cpu_linear import CPULinear

    monkeypatch.setattr(CPULinear, "onednn_fp32", True)
    torch.manual_seed(0)
    layer = CPULinear(96, 160, bias=bias)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    x = torch.randn(3, 37, 96, requires_grad=True)
    grad = torch.randn(3, 160, 37).transpose(1, 2)  # as the gradient flowing back through a transpose is
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_OneDNNLinearBackward"
    expected = F.linear(x, layer.weight, layer.bias)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, expected, **tol)
    for got, want in zip(torch.autograd.grad(y, [x, *params], grad), torch.autograd.grad(expected, [x, *params], grad)):
        torch.testing.assert_close(got, want, **tol)

    layer.requires_grad_(False)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_OneDNNLinearBackward"
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], grad @ layer.weight, **tol)
    layer.requires_grad_(True)

    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_OneDNNLinearBackward"
    y = layer.to(torch.bfloat16)(x.detach().bfloat16().requires_grad_())
    assert type(y.grad_fn).__name__ != "_OneDNNLinearBackward"


def test_fsdp_modules_keep_f_linear():
    """Under FSDP2 the gathered weights are rewritten by collectives, which no version counter promises to see: its
    modules never pack."""
    from model import Transformer
    from model.config import ModelConfig
    from model.cpu_linear import CPULinear
    from trainer.parallel import shard

    env = distributed.init_distributed("cpu", process_group=True)
    try:
        model = Transformer(ModelConfig(vocab_size=320, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                        max_seq_len=64))
        shard(model, env, torch.bfloat16)
        layers = [m for m in model.modules() if isinstance(m, CPULinear)]
        assert len(layers) == 2 * 7 + 1 and not any(m.pack for m in layers)
    finally:
        distributed.destroy()


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="Inductor needs a C++ compiler")
def test_compiled_decode_step_generates_the_eager_tokens():
    from model import Transformer, generate
    from model.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                    max_seq_len=64)).eval()
    prompt = torch.randint(3, 320, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # a left-padded row: the compiled step also takes the attention-mask path
    eager = torch.stack(list(generate(model, prompt, 12, temperature=0, attention_mask=mask)), dim=1)
    compiled = torch.stack(list(generate(model, prompt, 12, temperature=0, attention_mask=mask, compile=True)), dim=1)
    assert torch.equal(compiled, eager)
