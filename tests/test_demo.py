"""`llama2-mlx demo` at its tiny size: every stage runs from nothing and the report has each stage's table."""

from __future__ import annotations

import re

from click.testing import CliRunner

from llama2_mlx.cli import cli


def test_tiny_demo_runs_every_stage_and_sft_beats_pretraining(tmp_path):
    out = tmp_path / "recipe"
    result = CliRunner().invoke(cli, ["demo", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    sections = re.findall(r"^## (\w+):", report, flags=re.MULTILINE)
    assert sections == ["pretrain", "sft", "reward", "rejection", "gatt", "dpo", "timing"]
    assert "SFT beats the pretrained model" in report, report
    assert "| margin | " in report and "| none |" in report and "| large |" in report
    assert "| iteration | mean T=0.8 | max T=0.8 | mean T=1.2 | max T=1.2 | selected |" in report
    assert "| without GAtt |" in report and "| with GAtt |" in report
    for png in (
        "pretrain_loss.png",
        "sft_loss.png",
        "figure7_iter1.png",
        "figure7_iter2.png",
        "adherence.png",
    ):
        assert (out / png).is_file(), png
    for folder in ("pretrained", "sft", "rm-none", "rm-large", "rejection/iter-2/adapter", "gatt", "dpo"):
        assert (out / folder).is_dir(), folder
    # every stage's output is an ordinary folder the other commands take
    scored = CliRunner().invoke(
        cli, ["score", str(out / "rm-large"), "--data", str(out / "world/preferences/valid.jsonl")]
    )
    assert scored.exit_code == 0, scored.output
    # --from-stage reruns the later stages in place, replacing their sections
    again = CliRunner().invoke(cli, ["demo", "--size", "tiny", "--out", str(out), "--from-stage", "dpo"])
    assert again.exit_code == 0, again.output
    assert re.findall(r"^## (\w+):", (out / "report.md").read_text(), flags=re.MULTILINE).count("dpo") == 1
    refused = CliRunner().invoke(cli, ["demo", "--size", "tiny", "--out", str(out)])
    assert refused.exit_code == 1 and "already exists" in refused.output
