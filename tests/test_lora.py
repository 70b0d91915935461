"""LoRA: the layer's math, freezing, merge == unmerged, PEFT layout (and PEFT itself), --mode lora end to end."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import check_resume_is_exact, sft_args, train_losses
from model import ModelConfig, Transformer
from model.config import config_from_preset
from model.cpu_linear import CPULinear, packs
from model.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, count_parameters, load_adapter, lora_layers,
                        merge_lora, save_adapter)
from trainer.errors import UsageError


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config_from_preset("tiny", dropout=0.0)).eval()


def randomize_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (LoRA is a no-op at init); give it values so the tests see the update."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)


def test_lora_linear_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=False)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: exactly the base model at the start
    torch.nn.init.normal_(layer.lora_B.weight)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ base.weight.T + (x @ A.T @ B.T) * 2.0)  # alpha / r = 2
    torch.testing.assert_close(layer.merged()(x), layer(x), atol=1e-5, rtol=1e-5)
    assert not layer.weight.requires_grad and A.requires_grad and B.requires_grad


def test_apply_lora_freezes_the_base_and_trains_only_adapters():
    model = tiny_model()
    n_base = model.num_params()
    wrapped = apply_lora(model, rank=4, alpha=8, targets=",".join(DEFAULT_TARGETS))
    assert len(wrapped) == 7 * model.config.n_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    n_lora = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert count_parameters(model) == (n_lora, n_base + n_lora)
    # The base weights keep their Hugging Face names: a wrapped model still reads its base checkpoint.
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    with pytest.raises(ValueError, match="qproj match no linear layer; this model has: down_proj, gate_proj"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets="qproj")
    # PEFT's "all-linear": every linear layer but the output layer; for this model, the seven projections.
    assert apply_lora(tiny_model(), rank=4, alpha=8, targets="all-linear") == wrapped
    moe = Transformer(config_from_preset("tiny", use_moe=True, n_routed_experts=2, num_experts_per_tok=1))
    names = apply_lora(moe, rank=4, alpha=8, targets="all-linear")
    assert "model.layers.0.mlp.gate" in names and "model.layers.0.mlp.experts.1.down_proj" in names
    assert "lm_head" not in names and not moe.lm_head.weight.requires_grad


def test_merged_and_unmerged_models_give_the_same_logits():
    model = tiny_model()
    apply_lora(model, rank=8, alpha=16, dropout=0.1, targets=DEFAULT_TARGETS)
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        unmerged = model(ids).logits
        plain = tiny_model()(ids).logits
        merged = merge_lora(model)(ids).logits
    assert not lora_layers(model)  # plain nn.Linear layers again: saves as an ordinary HF folder
    assert (unmerged - plain).abs().max() > 1e-2  # the adapter does change the model ...
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # ... and merging keeps exactly that


def test_adapter_files_follow_the_peft_layout_and_load_back(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    randomize_adapters(model)
    save_adapter(model, tmp_path, base_model_path="some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "some/base")
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight"
                    for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"}
    loaded = load_adapter(tiny_model(), tmp_path).eval()
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


# ----------------------------------------------------------------------------- train.py --mode lora


def lora_args(files, base, out, *extra: str) -> list[str]:
    args = sft_args(files, base, out, *extra)
    args[args.index("sft")] = "lora"
    return args


@pytest.fixture(scope="module")
def lora_run(sft_files, base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    train.main(lora_args(sft_files, base_model, out, "--max_steps", "12", "--learning_rate", "1e-2",
                         "--lora_rank", "4", "--eval_interval", "0", "--merge"))
    return out


def test_lora_run_trains_only_the_adapter_and_exports_it(lora_run, base_model, capsys):
    losses = train_losses(lora_run)
    assert sum(losses[s] for s in range(10, 13)) / 3 < losses[1]
    final = lora_run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "zero2llm.json"} <= {
        p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()  # only the adapter: the base is not copied
    info = json.loads((final / "zero2llm.json").read_text())
    assert info["chat"] is True and info["base_model"] == str(base_model.resolve())
    # The frozen base is unchanged: the last checkpoint (base + adapter) still holds the --init_from weights.
    ckpt = load_file(str(sorted((lora_run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    base = load_file(str(base_model / "model.safetensors"))
    for name, tensor in base.items():
        assert torch.equal(ckpt[name], tensor), name
    assert any(ckpt[k].abs().sum() > 0 for k in ckpt if k.endswith("lora_B.weight"))  # the adapter learned
    assert json.loads((final / "merged" / "zero2llm.json").read_text())["chat"] is True


def test_eval_model_loads_base_plus_adapter(lora_run, base_model, tmp_path, capsys):
    import eval_model

    final = lora_run / "final"
    ids = torch.randint(0, 6400, (1, 12))
    with torch.no_grad():
        from_adapter = eval_model.load_model(final)(ids).logits
        merged = Transformer.from_pretrained(final / "merged").eval()(ids).logits
    torch.testing.assert_close(from_adapter, merged, atol=1e-5, rtol=1e-5)
    # The run's last checkpoint (base and adapter in one file, for resume) is the same model, merged on reading.
    last = sorted((lora_run / "checkpoints").iterdir())[-1]
    assert last.name == "step_000012"
    with torch.no_grad():
        torch.testing.assert_close(eval_model.load_model(last)(ids).logits, merged, atol=1e-5, rtol=1e-5)
    moved = tmp_path / "adapter"
    shutil.copytree(final, moved, ignore=shutil.ignore_patterns("merged"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/base"}))
    with pytest.raises(SystemExit, match="its adapter_config.json names this folder: pass --base_model_path"):
        eval_model.main(["--model_path", str(moved), "--prompt", "Hi", "--max_new_tokens", "2"])
    with pytest.raises(SystemExit, match="point --base_model_path at the model the adapter was trained on"):
        eval_model.main(["--model_path", str(moved), "--base_model_path", str(tmp_path / "nowhere"), "--prompt", "Hi"])
    with pytest.raises(SystemExit, match="--base_model_path is for a LoRA adapter folder; .* is a whole model"):
        eval_model.main(["--model_path", str(base_model), "--base_model_path", str(base_model), "--prompt", "Hi"])
    eval_model.main(["--model_path", str(moved), "--base_model_path", str(base_model), "--prompt", "What is 2 + 3?",
                     "--max_new_tokens", "3", "--temperature", "0"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a transformers API deprecated in v6
def test_peft_loads_our_adapter_onto_the_transformers_base(lora_run, base_model):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    final = lora_run / "final"
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), final).eval()
    ours = load_adapter(Transformer.from_pretrained(base_model), final).eval()
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
        merged_hf = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
        torch.testing.assert_close(merged_hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_resume_continues_with_identical_losses(sft_files, base_model, tmp_path):
    check_resume_is_exact(lambda out, *extra: lora_args(sft_files, base_model, out, *extra), tmp_path, 6, 3,
                          "--lr_decay_iters", "6", "--eval_interval", "0", "--lora_dropout", "0.1", "--save_interval_steps",
                          "3", "--no-save_last", "--learning_rate", "1e-2")


def test_lora_user_errors(sft_files, base_model, lora_run, tmp_path, capsys):
    with pytest.raises(UsageError, match="--lora_target_modules qkv: LoRA target module"):
        train.main(lora_args(sft_files, base_model, tmp_path / "x", "--lora_target_modules", "qkv"))
    with pytest.raises(SystemExit):
        train.main(lora_args(sft_files, lora_run / "final", tmp_path / "y"))
    assert "holds a LoRA adapter, not a full model: use its merged/ folder" in capsys.readouterr().err


def test_a_lora_wrapped_projection_is_refused_the_packed_product(monkeypatch):
    """Decoding asks packs() of q/k/v together; a LoRA-wrapped q_proj holds no weight or bias of its own, and must
    take its own forward (on CPUs without AMX any number of rows reaches this check: validation, eval)."""
    monkeypatch.setattr(CPULinear, "pack", True)
    monkeypatch.setattr(CPULinear, "pack_max_rows", None)
    model = Transformer(ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16))
    apply_lora(model, rank=4, alpha=8, targets="q_proj")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not packs(x, (attn.q_proj, attn.k_proj, attn.v_proj))
        model.to(torch.bfloat16)(torch.randint(0, 64, (1, 3)))
