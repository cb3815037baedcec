"""What the docs and help texts say matches what is there: the demo model's size, the plot hint, pretrain's two
kinds of config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.loading import demo_model_path
from llama2_mlx.model_folder import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_demo_model_size_is_the_same_everywhere():
    from mlx.utils import tree_flatten

    parameters = sum(v.size for _, v in tree_flatten(load_model(demo_model_path()).parameters()))
    megabytes = (demo_model_path() / "model.safetensors").stat().st_size / 1e6
    stated = f"{parameters / 1e6:.2f}M parameters, {megabytes:.1f} MB"
    assert stated == "0.87M parameters, 3.5 MB"
    assert stated in (ROOT / "README.md").read_text()
    script = (ROOT / "examples" / "build_demo_model.sh").read_text()
    assert re.search(r"0\.87 M parameters, 3\.5 MB", script)


def test_plot_hint_names_what_to_install(tmp_path, monkeypatch):
    from llama2_mlx.plot import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(Llama2MLXError, match=r"^plotting needs matplotlib: pip install matplotlib$"):
        plot_run(tmp_path)


def test_pretrain_help_tells_the_two_configs_apart():
    text = " ".join(CliRunner().invoke(cli, ["pretrain", "--help"]).output.split())
    assert "--config TEXT The architecture: a size preset" in text
    assert "(not the YAML of flag values: that is -c/--config-file)" in text
