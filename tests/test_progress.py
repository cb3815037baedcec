"""Progress on stderr: redrawn in place on a terminal; whole lines, one per tenth of the work, when piped; and the
long commands (convert, export, fuse, eval, training) show it."""

from __future__ import annotations

import io
from pathlib import Path

from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.loading import demo_model_path
from llama2_mlx.progress import Progress
from llama2_mlx.trainer import ProgressBar

HELDOUT = Path(__file__).resolve().parents[1] / "examples" / "data" / "heldout.jsonl"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_progress_is_whole_lines_one_per_tenth():
    stream = io.StringIO()
    with Progress("work", " items", stream=stream) as progress:
        for done in range(1, 101):
            progress.update(done, 100)
    lines = stream.getvalue().splitlines(keepends=True)
    assert "\r" not in stream.getvalue() and all(line.endswith("\n") for line in lines)
    assert [line.split()[2] for line in lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert lines[-1] == "work [####################] 100/100 items\n"


def test_terminal_progress_redraws_one_line():
    stream = _Terminal()
    with Progress("copy", " MB", scale=10**6, stream=stream) as progress:
        progress.tensor("a", 10**6, 2 * 10**6)
        progress.tensor("b", 2 * 10**6, 2 * 10**6)
    assert stream.getvalue() == (
        "\rcopy [##########..........] 1.0/2.0 MB  a\rcopy [####################] 2.0/2.0 MB  b\n"
    )


def test_training_progress_piped_is_one_line_per_report():
    stream = io.StringIO()
    bar = ProgressBar(4, stream=stream)
    for step in (2, 4):
        bar.on_report({"step": step, "loss": 1.0, "lr": 1e-4, "tokens_per_sec": 10.0, "peak_memory_gb": 0.1})
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and len(lines) == 3 and lines[-1] == ""
    assert lines[1].startswith("[####################] step 4/4  loss 1.0000")


def test_long_commands_show_progress(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(demo_model_path()), str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("converting [")]
    assert 1 <= len(lines) <= 10 and lines[-1].startswith("converting [####################] 3.5/3.5 MB")
    result = runner.invoke(cli, ["export", str(tmp_path / "c"), str(tmp_path / "e")])
    assert result.exit_code == 0 and "exporting [####################] 3.5/3.5 MB" in result.stderr
    result = runner.invoke(cli, ["eval", "--prompts", str(HELDOUT)])
    assert result.exit_code == 0 and "answering [####################] 12/12 answers\n" in result.stderr
    adapter = tmp_path / "adapter"
    result = runner.invoke(cli, ["sft", "--data", str(HELDOUT.parent / "sft_messages.jsonl"), "--out", str(adapter),
                                 "--iters", "1", "--batch-size", "2", "--seq-len", "128"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["fuse", "--adapter", str(adapter), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0 and "writing [####################] 3.5/3.5 MB" in result.stderr
