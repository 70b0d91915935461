"""scripts/pipeline_report.py: the README's pipeline figures are the last recorded report's, and the report
measures the runs it made."""
from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, read_metrics
from model.config import config_from_preset
from scripts import pipeline_report as pr


def test_readme_shows_the_recorded_report():
    """README.md's table is render(docs/pipeline_report.json): a figure typed by hand, or a report recorded
    without updating README.md, fails here. Re-run `python scripts/pipeline_report.py --update_readme`."""
    report = json.loads((ROOT / "docs" / "pipeline_report.json").read_text())
    assert report["train_args"] == "" and report["limit"] == 0, "the README shows default flags on all held-out data"
    assert report["stages"] == list(pr.STAGES) and len(report["seeds"]) >= 3
    assert pr.readme_block(pr.README.read_text()) == pr.render(report)


def fake_report(seeds: list[int]) -> dict:
    """A report of three seeds whose figures differ by seed, to check the table's arithmetic."""
    chats = {"loss": 1.0, "stop_rate": 0.0, "exact_match": 0.0, "arithmetic_accuracy": 0.0, "arithmetic": 5,
             "conversations": 10}
    runs = {}
    for i, seed in enumerate(seeds):
        sft = {**chats, "stop_rate": 1.0, "exact_match": 0.1 * (i + 1), "loss": 0.5}
        runs[str(seed)] = {
            "pretrain": {"minutes": 3.0 + i, "before": math.log(6400), "after": 5.0 + 0.3 * i},
            "sft": {"minutes": 6.0, "before": chats, "after": sft, "passed": True},
            "lora": {"minutes": 5.0, "before": sft, "after": {**sft, "loss": 0.4}, "passed": True},
            "dpo": {"minutes": 2.0, "before": {"loss": math.log(2), "accuracy": 0.0},
                    "after": {"loss": 0.5, "accuracy": 0.75}},
            "grpo": {"minutes": 4.0, "before": 0.40, "after": 0.48 + 0.01 * i, "prompts": 200, "wrong_to_right": 20 + i,
                     "right_to_wrong": 4, "p": 0.001, "passed": i > 0, "reward": [0.25, 0.40]}}
    return {"seeds": seeds, "stages": list(pr.STAGES), "commit": "abc1234", "date": "2026-12-01", "train_args": "",
            "limit": 0, "machine": "a CPU", "runs": runs}


def test_table_gives_mean_and_range_over_seeds():
    table = pr.render(fake_report([1, 2, 3]))
    rows: dict[str, str] = {}  # the first row of each measure (sft's before lora's)
    for line in table.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[2], line)
    assert "| pretrain | 4.0 (3.0–5.0) |" in table
    assert rows["validation loss (`pretrain_val.jsonl`)"].endswith("| 8.76 (uniform guess) | 5.300 (5.000–5.600) |")
    assert rows["exact answer"].endswith("| 0.0% | 20.0% (10.0%–30.0%) |")
    assert "+8.0 (20 / 4, p 0.001); +9.0 (21 / 4, p 0.001); +10.0 (22 / 4, p 0.001)" in table
    assert rows["`pipeline_check.py --task grpo` passes"].endswith("| 2 of 3 |")
    assert "seeds 1, 2, 3" in table and "Training time of the 5 stages: 21 (20–22) minutes." in table


def test_update_readme_replaces_only_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{pr.BEGIN}\nold table\n{pr.END}\nafter\n")
    pr.update_readme(readme, "new table\n| a |")
    assert readme.read_text() == f"# Title\n\nbefore\n{pr.BEGIN}\nnew table\n| a |\n{pr.END}\nafter\n"
    readme.write_text(f"{pr.BEGIN}\n{pr.END}\n")  # an empty table, as before the first report
    pr.update_readme(readme, "t")
    assert readme.read_text() == f"{pr.BEGIN}\nt\n{pr.END}\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="pipeline-report: begin"):
        pr.update_readme(readme, "x")


@pytest.mark.parametrize("argv, message", [
    (["--stages", "pretrain,lora"], "lora start from sft: add it"),
    (["--stages", "pretrain,rlhf"], "rlhf unknown"),
    (["--update_readme", "--train_args", "--max_steps 2"], "drop --train_args, --stage_args and --limit"),
    (["--update_readme", "--stage_args", "pretrain=--preset mini"], "drop --train_args, --stage_args and --limit"),
    (["--stage_args", "pretrain"], "--stage_args pretrain: give STAGE=FLAGS"),
    (["--stage_args", "rlhf=--beta 1"], "--stage_args rlhf=--beta 1: give STAGE=FLAGS, STAGE one of pretrain"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pr.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_short_report_measures_its_own_runs(tmp_path, capsys):
    """Two steps of every stage, one seed, pretraining's model the mini preset (a flag the fine-tuning modes
    refuse): the record holds what the runs wrote, and a second report into the same folder is refused unless told
    to overwrite."""
    work, record = tmp_path / "runs", tmp_path / "report.json"
    argv = ["--seeds", "7", "--train_args", "--max_steps 2 --eval_iters 2", "--stage_args", "pretrain=--preset mini",
            "--limit", "6", "--work_dir", str(work), "--report", str(record)]
    pr.main(argv)
    report = json.loads(record.read_text())
    run, folder = report["runs"]["7"], work / "seed-7"
    assert report["stages"] == list(pr.STAGES) and report["train_args"] == "--max_steps 2 --eval_iters 2"
    assert report["stage_args"] == {"pretrain": "--preset mini"}
    mini = config_from_preset("mini")
    for model in ("pretrain/final", "sft/final", "lora/final/merged", "dpo/final", "grpo/final"):  # all mini
        config = json.loads((folder / model / "config.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"]) == (mini.dim, mini.n_layers), model
    for stage in pr.STAGES:
        assert run[stage]["minutes"] > 0
        assert max(r["step"] for r in read_metrics(folder / stage) if "step" in r) == 2
    exported = json.loads((folder / "pretrain" / "final" / "zero2llm.json").read_text())
    assert run["pretrain"]["after"] == pytest.approx(exported["val_loss"])
    assert run["pretrain"]["before"] == pytest.approx(math.log(6400))
    assert run["sft"]["after"] == run["lora"]["before"] and run["sft"]["after"]["conversations"] == 6
    assert run["sft"]["before"]["stop_rate"] == 0.0  # a pretrained model never ends a chat turn
    dpo_eval = [r for r in read_metrics(folder / "dpo") if "val_loss" in r][-1]
    assert run["dpo"]["after"] == {"loss": dpo_eval["val_loss"], "accuracy": dpo_eval["val_rewards/accuracy"]}
    rewards = [r["reward"] for r in read_metrics(folder / "grpo") if "reward" in r]
    assert run["grpo"]["reward"] == pytest.approx([sum(rewards) / len(rewards)] * 2)  # 2 steps: both windows
    assert run["grpo"]["prompts"] == 6 and not run["grpo"]["passed"]  # two steps teach nothing
    assert pr.render(report) in capsys.readouterr().out
    with pytest.raises(SystemExit, match="was run with --train_args/--stage_args/--limit"):  # README.md shows defaults only
        pr.main(["--render", "--report", str(record), "--update_readme"])

    with pytest.raises(SystemExit):
        pr.main(argv)
    assert "already holds runs: pass --overwrite" in capsys.readouterr().err
    pr.main(argv + ["--overwrite", "--stages", "pretrain"])
    assert json.loads(record.read_text())["stages"] == ["pretrain"]
    assert not (folder / "sft").exists()  # the earlier runs of that seed were replaced, as asked
