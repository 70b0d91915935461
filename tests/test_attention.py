"""The lower-triangle attention kernel (model/attention.py) computes causal attention, and the model uses it where
it should (its speed is measured in bench/attention.py and bench/train_throughput.py, never here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import attention
from model.attention import TILE, tiled_causal_attention, use_tiled_attention


def model_layout(B: int, heads: int, T: int, D: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """[B, heads, T, D] as the model makes it: a transposed view of [B, T, heads, D] memory."""
    return torch.randn(B, T, heads, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()


def attention_and_grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), grads


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("heads, kv_heads, T, D", [
    (4, 2, 2 * TILE + 17, 32),   # grouped heads; a last tile shorter than the others
    (4, 4, TILE + 1, 16),        # one head per KV head; a one-position last tile
    (6, 2, 3 * TILE, 64),        # three heads per group; T a multiple of the tile
    (2, 1, TILE - 5, 32),        # shorter than one tile: the whole square, masked
])
def test_tiled_attention_equals_causal_sdpa_in_fp32(heads, kv_heads, T, D):
    g = torch.Generator().manual_seed(T)
    q, dout = (model_layout(2, heads, T, D, torch.float32, g) for _ in range(2))
    k, v = (model_layout(2, kv_heads, T, D, torch.float32, g) for _ in range(2))
    dout = dout.detach()
    ref, ref_grads = attention_and_grads(sdpa, q, k, v, dout)
    out, grads = attention_and_grads(tiled_causal_attention, q, k, v, dout)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.shape == ref_grad.shape, name
        torch.testing.assert_close(grad, ref_grad, atol=2e-5, rtol=2e-5, msg=name)


def test_tiled_attention_in_bf16_is_as_close_to_exact_as_sdpa():
    """bf16 rounds the scores before the fp32 softmax and the probabilities after it (as transformers' eager
    attention does): the output may differ from exact attention a little more than SDPA's (which keeps fp32
    scores), the gradients no more than SDPA's do (dK and dV are summed in fp32 here)."""
    g = torch.Generator().manual_seed(0)
    q, dout = (model_layout(2, 4, 3 * TILE + 9, 32, torch.bfloat16, g) for _ in range(2))
    k, v = (model_layout(2, 2, 3 * TILE + 9, 32, torch.bfloat16, g) for _ in range(2))
    dout = dout.detach()
    exact, exact_grads = attention_and_grads(sdpa, *(x.detach().double().requires_grad_() for x in (q, k, v)),
                                             dout.double())
    results = {fn.__name__: attention_and_grads(fn, q, k, v, dout) for fn in (sdpa, tiled_causal_attention)}
    (ours, ours_grads), (theirs, theirs_grads) = results["tiled_causal_attention"], results["sdpa"]
    assert ours.dtype == torch.bfloat16 and all(grad.dtype == torch.bfloat16 for grad in ours_grads)

    def error(x, ref):
        return float((x.double() - ref).abs().max() / ref.abs().max())

    assert error(ours, exact) < 3 * error(theirs, exact) + 1e-3
    assert error(ours, exact) < 1e-2
    for name, grad, their_grad, exact_grad in zip("qkv", ours_grads, theirs_grads, exact_grads):
        assert error(grad, exact_grad) < 1.5 * error(their_grad, exact_grad) + 1e-3, name


def test_output_is_laid_out_for_o_proj():
    """The output is a [B, heads, T, D] view of [B, T, heads, D] memory, so the model's transpose(1, 2).reshape is
    free (no copy)."""
    g = torch.Generator().manual_seed(0)
    q = model_layout(1, 4, TILE + 3, 8, torch.float32, g)
    k, v = (model_layout(1, 2, TILE + 3, 8, torch.float32, g) for _ in range(2))
    out = tiled_causal_attention(q, k, v)
    assert out.shape == (1, 4, TILE + 3, 8) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("device, T, dtype, amx, expected", [
    ("cpu", TILE + 1, torch.float32, False, True),
    ("cpu", TILE + 1, torch.bfloat16, False, True),     # bf16 without AMX: SDPA gains nothing from bf16 there
    ("cpu", TILE + 1, torch.bfloat16, True, False),     # AMX: SDPA's kernel packs its blocks for the AMX tiles
    ("cpu", TILE + 1, torch.float32, True, True),
    ("cpu", TILE, torch.float32, False, False),         # one tile: nothing to skip
    ("meta", TILE + 1, torch.float32, False, False),    # not a CPU (CUDA's SDPA kernels skip masked blocks)
])
def test_which_calls_take_the_tiled_kernel(monkeypatch, device, T, dtype, amx, expected):
    monkeypatch.setattr(attention, "cpu_has_amx", lambda: amx)
    q = torch.empty(1, 2, T, 8, device=device)
    assert use_tiled_attention(q, dtype) is expected


def count_tiled_calls(monkeypatch) -> list[int]:
    """Record the T of every call the model makes to the tiled kernel."""
    from model import model as model_module

    calls: list[int] = []

    def spy(q, k, v):
        calls.append(q.shape[-2])
        return tiled_causal_attention(q, k, v)

    monkeypatch.setattr(model_module, "tiled_causal_attention", spy)
    return calls


def tiny_model(**overrides):
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                             multiple_of=16, max_seq_len=256), **overrides}))


def test_model_trains_through_the_tiled_kernel_with_sdpas_loss_and_gradients(monkeypatch):
    """A causal, unpadded training batch longer than a tile goes through the tiled kernel (both layers), and loss
    and gradients are SDPA's, also under bf16 autocast, where q and k come out of RoPE in fp32 and v in bf16."""
    calls = count_tiled_calls(monkeypatch)
    model = tiny_model()
    x = torch.randint(0, 97, (2, 2 * TILE + 5), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        results = []
        for tiled in (True, False):
            for block in model.model.layers:
                block.self_attn.tiled = tiled
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = F.cross_entropy(model(x[:, :-1]).logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss, grads), (ref_loss, ref_grads) = results
        torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
        for grad, ref in zip(grads, ref_grads):
            assert (grad - ref).abs().max() <= tol * ref.abs().max().clamp(min=1e-6)
    assert calls == [2 * TILE + 4] * 4  # 2 layers x 2 dtypes; the SDPA runs did not call it


def test_padded_batches_dropout_and_decoding_keep_sdpa(monkeypatch):
    calls = count_tiled_calls(monkeypatch)
    from model import generate

    x = torch.randint(3, 97, (2, TILE + 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    tiny_model()(x, attention_mask=mask)  # padding needs a mask: SDPA
    tiny_model(dropout=0.1).train()(x)  # attention dropout: SDPA
    assert calls == []
    model = tiny_model().eval()
    tiny_model(dropout=0.1).eval()(x)  # dropout is off in eval: tiled
    list(generate(model, x[:1], 3, temperature=0))  # the prefill is causal and unpadded: tiled; each new token: SDPA
    assert calls == [TILE + 8, TILE + 8] * 2


def test_compiled_blocks_run_the_tiled_kernel(monkeypatch):
    """torch.compile traces the kernel's autograd.Function (tile loop unrolled) and computes what eager does."""
    from trainer.parallel import compile_blocks

    monkeypatch.setattr(attention, "TILE", 8)  # three tiles in a short sequence keep the compilation quick
    eager, compiled = tiny_model(max_seq_len=32, n_layers=1), tiny_model(max_seq_len=32, n_layers=1)
    compile_blocks(compiled, torch.device("cpu"))
    x = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (eager, compiled):
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[1][1], losses[0][1], atol=1e-5, rtol=1e-4)


def test_right_padded_batches_take_the_causal_path_with_each_rows_own_logits(monkeypatch):
    """SFT and DPO batches are right-padded: under causal attention a real token never sees the padding after it,
    so the model needs no mask and takes the tiled kernel; each row's real positions get the logits the row gets
    alone, unpadded. A left-padded batch still needs its mask."""
    calls = count_tiled_calls(monkeypatch)
    model = tiny_model().eval()
    x = torch.randint(3, 97, (3, TILE + 20), generator=torch.Generator().manual_seed(4))
    lengths = [TILE + 20, TILE + 7, TILE + 12]
    mask = torch.zeros_like(x)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    with torch.no_grad():
        batched = model(x, attention_mask=mask).logits
        alone = [model(x[row:row + 1, :n]).logits[0] for row, n in enumerate(lengths)]
    for row, n in enumerate(lengths):
        torch.testing.assert_close(batched[row, :n], alone[row], atol=1e-5, rtol=1e-5)
    assert calls == [TILE + 20] * 2 + [n for n in lengths for _ in range(2)]
    calls.clear()
    with torch.no_grad():
        model(x, attention_mask=mask.flip(1))  # left padding
    assert calls == []
