"""Beside TRL: our trainer and TRL's, on the same tiny model, data lines and settings, give the same losses step for
step (a small version of bench/peers.py, so that a change moving our loss away from TRL's fails here).

TRL is a test dependency (bench/requirements.txt, installed by `make`); without it these are skipped.
"""
from __future__ import annotations

import dataclasses
import sys

import pytest

from conftest import ROOT

pytest.importorskip("trl")
sys.path.insert(0, str(ROOT / "bench"))
import peers  # noqa: E402

STEPS = 3
SFT = peers.Settings("sft", learning_rate=1e-3, batch_size=4, steps=STEPS)
DPO = peers.Settings("dpo", learning_rate=1e-3, batch_size=4, steps=STEPS)
# Two prompts x 4 fixed completions, 2 updates per batch of rollouts: step 2 trains on a ratio to the policy of step 1.
GRPO = peers.Settings("grpo", learning_rate=1e-3, batch_size=2, steps=STEPS)
SAME = [
    peers.Case("sft", SFT),
    peers.Case("dpo sigmoid", DPO),
    peers.Case("grpo dapo", GRPO),
    peers.Case("grpo cispo", dataclasses.replace(GRPO, loss_type="cispo", epsilon_high=0.0, trl_epsilon_high=1.0)),
    peers.Case("sft qwen3-moe", dataclasses.replace(SFT, aux_loss=False), model="qwen3_moe"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder for the module: the models are made once, each run gets its own subfolder."""
    return tmp_path_factory.mktemp("peers")


@pytest.mark.parametrize("case", SAME, ids=[c.name for c in SAME])
def test_losses_equal_trls(case, folder, tok):
    """fp32: every step's loss equals TRL's to 1e-5 (the optimizer steps agree too, or later losses would part)."""
    ours, theirs = peers.compare(case, folder, tok)
    assert len(ours.losses) == len(theirs.losses) == STEPS
    assert peers.max_difference(ours, theirs) < 1e-5, (ours.losses, theirs.losses)


def test_cispo_cap_differs_from_trls_spelling(folder, tok):
    """The one flag spelled otherwise: --epsilon_high 1 caps CISPO's ratio weights at 2 here, TRL's epsilon_high 1 at
    1, so the losses agree at step 1 (ratio 1) and part once the ratio to the sampling policy exceeds 1."""
    case = peers.Case("grpo cispo", dataclasses.replace(GRPO, loss_type="cispo", epsilon_high=1.0,
                                                        trl_epsilon_high=1.0))
    ours, theirs = peers.compare(case, folder, tok)
    assert ours.losses[0] == pytest.approx(theirs.losses[0], abs=1e-5)
    assert abs(ours.losses[1] - theirs.losses[1]) > 1e-3
