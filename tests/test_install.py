"""A built wheel (what `pip install .` installs) carries the demo model and reward model, so `generate` and `score`
work with no MODEL outside a checkout; pyproject's package list holds every subpackage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages
from setuptools.config.pyprojecttoml import read_configuration

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_subpackage():
    listed = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]["packages"]
    assert set(find_packages(str(ROOT), include=["llama2_mlx*"])) <= set(listed)


def test_installed_wheel_finds_the_demo_model(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "llama2_mlx", source / "llama2_mlx", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("demo", "demo-rm"):
        shutil.copytree(ROOT / "weights" / name, source / "weights" / name)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next(tmp_path.glob("llama2_mlx-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    environment = {k: v for k, v in os.environ.items() if k != "LLAMA2_MLX_DEMO_MODEL"} | {
        "PYTHONPATH": str(site)
    }
    script = (
        "import sys, llama2_mlx; print(llama2_mlx.__file__); from llama2_mlx.cli import main; "
        "sys.argv = ['llama2-mlx', 'generate', '--prompt', 'What is the capital of Quenia?', '--temperature', '0']; "
        "main()"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    location, answer = result.stdout.splitlines()[:2]
    assert Path(location).is_relative_to(site)
    assert answer.strip() == "The capital of Quenia is Ardo."
    # the demo reward model ships too, and finds its base inside the package
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "Bananas.", "rating": "better"}\n'
    )
    script = f"import sys; from llama2_mlx.cli import main; sys.argv = ['llama2-mlx', 'score', '--data', '{pairs}']; main()"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
