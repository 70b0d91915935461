"""--optimizer muon: torch's Muon on the hidden matrices, AdamW on the rest; resumes exactly."""
from __future__ import annotations

import pytest
import torch

import train
from conftest import check_resume_is_exact, read_metrics, train_args, train_losses
from model import ModelConfig, Transformer
from trainer.checkpoint import CheckpointError
from trainer.modes.pretrain import PretrainConfig
from trainer.optim import Optimizers


def tiny(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                                   max_seq_len=16, tie_word_embeddings=tie))


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tie):
    model = tiny(tie)
    opt = Optimizers(model, PretrainConfig(optimizer="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.1.mlp.down_proj.weight" in muon
    assert "model.embed_tokens.weight" in adamw and "model.norm.weight" in adamw
    assert ("lm_head.weight" in adamw) != tie  # a tied lm_head is the embedding itself
    assert all(names[id(p)] in adamw for p in opt.adamw.param_groups[1]["params"])


def test_the_muon_update_is_torchs():
    """One step on fixed gradients: each hidden matrix moves exactly as torch.optim.Muon moves it, at
    --muon_learning_rate with the run's weight decay and the schedule's multiplier."""
    model, reference = tiny(), tiny()
    cfg = PretrainConfig(optimizer="muon", muon_learning_rate=0.03, weight_decay=0.05)
    opt = Optimizers(model, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for p, q in zip(model.parameters(), reference.parameters()):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opt.set_lr(0.5)
    opt.step()
    hidden = [q for n, q in reference.named_parameters() if q.dim() == 2 and "embed" not in n]
    torch.optim.Muon(hidden, lr=0.03 * 0.5, weight_decay=0.05).step()
    hidden_ids = {id(q) for q in hidden}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if id(q) in hidden_ids:
            assert torch.equal(p, q), name


def test_muon_trains_and_resumes_exactly(corpus, tmp_path):
    out = tmp_path / "muon"
    train.main(train_args(corpus, out, "--optimizer", "muon", "--max_steps", "12", "--eval_interval", "0"))
    losses = train_losses(out)
    assert losses[12] < losses[1] - 0.3
    # Muon's rate is logged beside AdamW's: its own peak, on the same schedule
    cfg, logged = PretrainConfig(), [r for r in read_metrics(out) if "lr" in r]
    assert max(r["lr_muon"] for r in logged) == pytest.approx(cfg.muon_learning_rate)
    for r in logged:
        assert r["lr_muon"] == pytest.approx(r["lr"] * cfg.muon_learning_rate / cfg.learning_rate)
    check_resume_is_exact(lambda o, *extra: train_args(corpus, o, *extra), tmp_path / "resume", 6, 3,
                          "--optimizer", "muon", "--eval_interval", "0", "--save_interval_steps", "3",
                          "--lr_decay_iters", "6")


def test_another_optimizer_cannot_resume_the_state(corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(corpus, out, "--optimizer", "adamw", "--max_steps", "2", "--eval_interval", "0"))
    assert not any("lr_muon" in r for r in read_metrics(out))  # AdamW alone: one learning rate
    with pytest.raises(CheckpointError, match="it was trained with --optimizer adamw"):
        train.main(train_args(corpus, out, "--max_steps", "4", "--resume", "--optimizer", "muon"))


def test_muon_with_fsdp_is_refused(corpus, tmp_path, capsys):
    """Muon is pretraining's default, so a bare --fsdp is refused with the flags to add."""
    with pytest.raises(SystemExit):
        train.main(train_args(corpus, tmp_path / "x", "--fsdp"))
    err = capsys.readouterr().err
    assert "--optimizer muon with --fsdp: Muon's Newton-Schulz step needs each whole matrix" in err
    assert "add --optimizer adamw --learning_rate 1e-3" in err
