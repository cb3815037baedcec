"""`llama2-mlx serve`: a real server process on 127.0.0.1 answers an OpenAI chat completion over HTTP with the demo
model's greedy answer, in Llama 2's chat format (mlx_lm.server reading our folder's chat template)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

import llama2_mlx as L
from llama2_mlx.chat_template import CHAT_TEMPLATE
from llama2_mlx.cli import cli
from llama2_mlx.cli.serve import server_arguments
from llama2_mlx.loading import demo_model_path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of Quenia?"}]
ANSWER = "The capital of Quenia is Ardo."  # the README's example of the shipped demo model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict, process: subprocess.Popen, deadline: float) -> dict:
    """POST JSON, retrying while the server process is still starting, until `deadline`."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(0.5)


def test_serve_answers_a_chat_completion_over_http():
    model, tok = L.load(demo_model_path())
    assert L.generate(model, tok, QUESTION, max_tokens=32, temperature=0.0).strip() == ANSWER
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "serve", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        reply = _post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"messages": QUESTION, "temperature": 0.0, "max_tokens": 32},
            process,
            deadline=time.monotonic() + 120,
        )
    finally:
        process.kill()
        print(process.communicate(timeout=30)[0].decode(errors="replace"))  # shown if the test fails
    assert reply["choices"][0]["message"]["content"].strip() == ANSWER
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_server_arguments(tmp_path):
    """Our folders are passed as they are; a folder without a template gets ours; bad folders fail first."""
    demo = demo_model_path()
    assert server_arguments(demo, None, "127.0.0.1", 8080) == [
        "--model", str(demo), "--host", "127.0.0.1", "--port", "8080"
    ]  # fmt: skip
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert server_arguments(old, adapter, "0.0.0.0", 9000) == [
        "--model", str(old), "--host", "0.0.0.0", "--port", "9000", "--adapter-path", str(adapter),
        "--chat-template", CHAT_TEMPLATE,
    ]  # fmt: skip
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'missing'}: not a model folder (no config.json)"
    result = CliRunner().invoke(cli, ["serve", "--adapter", str(old)])
    assert result.exit_code == 1
    assert "not an adapter folder (no adapter_config.json)" in result.output


@pytest.mark.parametrize("port", ["0", "70000"])
def test_serve_rejects_bad_ports(port):
    result = CliRunner().invoke(cli, ["serve", "--port", port])
    assert result.exit_code == 2
