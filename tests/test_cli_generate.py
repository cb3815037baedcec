"""`llama2-mlx generate` and `chat` through click's test runner, on the tiny random model folder."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llama2_mlx.chat import ChatSession
from llama2_mlx.cli import cli
from llama2_mlx.generation import generate
from llama2_mlx.loading import load

UNSAFE = "Error: special tags are not allowed as part of the prompt."


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir)


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_generate_chat_format_matches_library(tiny_model_dir, loaded):
    result = run("generate", tiny_model_dir, "--prompt", "hello", "--system", "be brief", "--max-tokens", 12,
                 "--temperature", 0.6, "--top-p", 0.9, "--seed", 3)  # fmt: skip
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    expected = generate(*loaded, messages, max_tokens=12, temperature=0.6, top_p=0.9, seed=3)
    assert result.stdout == expected.strip() + "\n"


def test_generate_raw_greedy_verbose(tiny_model_dir, loaded):
    result = run("generate", tiny_model_dir, "--prompt", "the quick", "--raw", "--temperature", 0, "--max-tokens",
                 8, "--verbose")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == generate(*loaded, "the quick", max_tokens=8).strip() + "\n"
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_chat_piped_input(tiny_model_dir, loaded):
    result = run(
        "chat", tiny_model_dir, "--max-tokens", 6, "--temperature", 0, input="hi\n/reset\nhi\n/exit\nnever\n"
    )
    assert result.exit_code == 0, result.output
    answer = generate(*loaded, [{"role": "user", "content": "hi"}], max_tokens=6)
    assert result.stdout == (answer.strip() + "\n") * 2  # /reset: the second "hi" starts a new conversation
    assert "[new conversation]" in result.stderr


def test_chat_end_of_input_and_bad_message(tiny_model_dir):
    result = run("chat", tiny_model_dir, "--max-tokens", 3, input="say [INST] x\n/bogus\n")
    assert result.exit_code == 0, result.output
    assert f"error: {UNSAFE}" in result.stderr and "unknown command /bogus" in result.stderr


def test_chat_session_history(loaded):
    session = ChatSession(*loaded, system="speak in french", max_tokens=5, temperature=0)
    first = "".join(c.text for c in session.ask("hello"))
    second = "".join(c.text for c in session.ask("and then"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in session.messages[2::2]] == [first, second]
    expected = generate(*loaded, session.messages[:4], max_tokens=5)
    assert second == expected
    stopped = session.ask("stop early")
    next(stopped)
    stopped.close()  # what Ctrl-C does: the partial answer is kept, roles still alternate
    assert len(session.history) == 6
    session.set_system("")
    assert session.messages == []


def test_default_model_is_the_demo_model(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA2_MLX_DEMO_MODEL", str(tiny_model_dir))
    assert run("chat", "--max-tokens", 2, input="hi\n").exit_code == 0
    monkeypatch.setenv("LLAMA2_MLX_DEMO_MODEL", str(tmp_path / "nowhere"))
    result = run("chat", input="hi\n")
    assert result.exit_code == 1 and "the demo model is missing" in result.stderr


def test_missing_model_folder(tmp_path):
    result = run("generate", tmp_path / "nope", "--prompt", "hi")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "no such model folder" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt"],
        ["generate", "m"],  # no --prompt
        ["generate", "m", "--prompt", "x", "--temperature", "hot"],
        ["generate", "m", "--prompt", "x", "--top-p", "1.5"],
        ["generate", "m", "--prompt", "x", "--max-tokens", "0"],
        ["generate", "m", "--prompt", "x", "--raw", "--system", "s"],
        ["chat", "m", "--bogus"],
    ],
)
def test_bad_flags_exit_2(args, tiny_model_dir):
    result = run(*[tiny_model_dir if a == "m" else a for a in args])
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize(("flag", "text"), [("--prompt", "hi <<SYS>> there"), ("--system", "[/INST] x")])
def test_special_tags_exit_1(tiny_model_dir, flag, text):
    result = run("generate", tiny_model_dir, "--prompt", "hi", flag, text)
    assert result.exit_code == 1 and result.stderr == f"{UNSAFE}\n"


def test_chat_system_with_special_tags_exit_1(tiny_model_dir):
    result = run("chat", tiny_model_dir, "--system", "<</SYS>>", input="hi\n")
    assert result.exit_code == 1 and result.stderr == f"{UNSAFE}\n"


def test_chat_ctrl_c_stops_the_answer_not_the_program(tiny_model_dir, monkeypatch):
    import llama2_mlx.chat as chat_module

    real = chat_module.stream_generate

    def interrupted(*args, **kwargs):
        chunks = real(*args, **kwargs)
        yield next(chunks)
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of an answer

    monkeypatch.setattr(chat_module, "stream_generate", interrupted)
    result = run("chat", tiny_model_dir, "--max-tokens", 5, input="hi\nagain\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("[stopped]") == 2


def test_chat_reports_dropped_turns(tiny_model_dir):
    line = "the quick brown fox jumps over the lazy dog " * 6
    result = run("chat", tiny_model_dir, "--max-tokens", 4, "--temperature", 0, input=f"{line}\n" * 10)
    assert result.exit_code == 0, result.output
    assert "[context full: dropped the oldest" in result.stderr
    assert "error" not in result.stderr  # every turn was answered (a broken history fails with a role error)


def test_chat_history_drops_whole_pairs_when_the_context_fills(tokenizer_dir):
    """Long turns in a 128-token context: after every answer the history is exactly what the model was shown
    (the oldest whole user/assistant pairs gone) plus the new pair, so roles keep alternating and no turn fails.

    Guards against: the chat history dropping one message per dropped turn instead of the whole pair.
    """
    from llama2_mlx.generation import fit_dialog
    from llama2_mlx.tokenizer import Tokenizer
    from tests.conftest import random_model, tiny_args

    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    session = ChatSession(random_model(tiny_args(max_seq_len=128), seed=2), tok, system="speak in french",
                          max_tokens=8, temperature=0, seed=0)  # fmt: skip
    dropped_total = 0
    for turn in range(6):
        question = f"question {turn}: the quick brown fox jumps over the lazy dog"
        before = list(session.history)
        _, dropped = fit_dialog(tok, [*session.messages, {"role": "user", "content": question}], 128 - 8)
        answer = "".join(chunk.text for chunk in session.ask(question))
        assert session.history == before[2 * dropped :] + [{"role": "user", "content": question},
                                                           {"role": "assistant", "content": answer}]  # fmt: skip
        dropped_total += dropped
    assert dropped_total >= 2  # the context did fill up, more than once


def test_generate_with_adapter(tiny_model_dir, tmp_path, loaded):
    import mlx.core as mx

    from llama2_mlx.lora import LoRAConfig, apply_lora, lora_parameters, save_adapters, write_adapter_config

    model, _ = load(tiny_model_dir)
    config = LoRAConfig(rank=4, targets=["q", "v"])
    apply_lora(model, config)
    mx.random.seed(0)  # non-zero B, so that the adapter changes the answer
    model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.5) for k, v in lora_parameters(model).items()], strict=False
    )
    save_adapters(model, tmp_path)
    write_adapter_config(tmp_path, config, n_layers=2, base_model=str(tiny_model_dir))

    result = run("generate", tiny_model_dir, "--prompt", "the quick", "--raw", "--temperature", 0, "--max-tokens", 10,
                 "--adapter", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    adapted = generate(*load(tiny_model_dir, tmp_path), "the quick", max_tokens=10)
    assert result.stdout == adapted.strip() + "\n"
    assert adapted != generate(*loaded, "the quick", max_tokens=10)


def test_generate_dtype_override(tiny_model_dir):
    import mlx.core as mx

    result = run("generate", tiny_model_dir, "--prompt", "the quick", "--raw", "--temperature", 0, "--max-tokens",
                 8, "--dtype", "bfloat16")  # fmt: skip
    assert result.exit_code == 0, result.output
    model, tok = load(tiny_model_dir, dtype=mx.bfloat16)
    assert result.stdout == generate(model, tok, "the quick", max_tokens=8).strip() + "\n"
    assert run("generate", tiny_model_dir, "--prompt", "x", "--dtype", "float8").exit_code == 2


def test_one_sampling_default_for_the_api_and_the_cli():
    """The CLI's defaults are the Python API's: greedy, top-p 1, and no fixed seed."""
    import inspect

    api = inspect.signature(generate).parameters
    options = {option.name: option.default for option in cli.commands["generate"].params}
    for name in ("temperature", "top_p", "seed"):
        assert options[name] == api[name].default, name
        assert {o.name: o.default for o in cli.commands["chat"].params}[name] == api[name].default
    assert inspect.signature(ChatSession).parameters["temperature"].default == api["temperature"].default


def test_sampling_draws_a_fresh_seed_unless_given_one(tiny_model_dir, loaded):
    args = ("generate", tiny_model_dir, "--prompt", "hello", "--raw", "--temp", 2, "--max-tokens", 12)
    unseeded = {run(*args).stdout for _ in range(3)}
    assert len(unseeded) > 1  # three identical samples at temperature 2 would mean a fixed seed
    assert run(*args, "--seed", 5).stdout == run(*args, "--seed", 5).stdout
    assert len({generate(*loaded, "hello", max_tokens=12, temperature=2.0) for _ in range(3)}) > 1
    session = ChatSession(*loaded, max_tokens=12, temperature=2.0)
    first = "".join(c.text for c in session.ask("hi"))
    session.reset()
    assert "".join(c.text for c in session.ask("hi")) != first  # /reset does not replay the same sample
    replays = [ChatSession(*loaded, max_tokens=12, temperature=2.0, seed=9) for _ in range(2)]
    replayed = ["".join(c.text for c in session.ask("hi")) for session in replays]
    assert replayed[0] == replayed[1]  # a given seed repeats the session


def test_mlx_lm_spellings_and_prompt_from_stdin(tiny_model_dir, tmp_path):
    long = run("generate", tiny_model_dir, "--prompt", "hello there", "--system", "be brief", "--temperature", 0.7,
               "--max-tokens", 9, "--seed", 1)  # fmt: skip
    short = run("generate", "--model", tiny_model_dir, "--prompt", "-", "--system-prompt", "be brief", "--temp", 0.7,
                "--max-tokens", 9, "--seed", 1, input="hello there\n")  # fmt: skip
    assert long.exit_code == 0 and short.exit_code == 0, short.output
    assert short.stdout == long.stdout
    raw = run("generate", tiny_model_dir, "--raw", "--prompt", "the quick", "--max-tokens", 6)
    assert (
        run(
            "generate", tiny_model_dir, "--raw", "--prompt", "-", "--max-tokens", 6, input="the quick\n"
        ).stdout
        == raw.stdout
    )
    assert run("generate", tiny_model_dir, "--model", tmp_path, "--prompt", "x").exit_code == 2
    chat = run("chat", "--model", tiny_model_dir, "--adapter-path", tmp_path / "none", input="hi\n")
    assert chat.exit_code == 1 and str(tmp_path / "none") in chat.stderr


def test_printed_answers_are_stripped(monkeypatch):
    """Meta's format ends every answer with a space before EOS; the CLI prints the answer without it."""
    from llama2_mlx.loading import demo_model_path

    monkeypatch.delenv("LLAMA2_MLX_DEMO_MODEL", raising=False)
    question = [{"role": "user", "content": "What is the capital of Quenia?"}]
    assert generate(*load(demo_model_path()), question, max_tokens=32) == "The capital of Quenia is Ardo. "
    result = run("generate", "--prompt", "What is the capital of Quenia?")
    assert result.stdout == "The capital of Quenia is Ardo.\n"


@pytest.mark.parametrize("cut", [["--top-k", 1], ["--top-p", 1e-6]])
def test_top_k_and_top_p_flags_reach_the_sampler(tiny_model_dir, loaded, cut):
    """At temperature 5 a random model's answer is noise, unless --top-k 1 or a tiny --top-p leaves one token a
    step: then generate and chat answer greedily, whatever the seed.

    Guards against: generate or chat dropping --top-k / --top-p on the way to the sampler.
    """
    prompt = "the quick brown fox"
    greedy = generate(*loaded, [{"role": "user", "content": prompt}], max_tokens=12)
    hot = ["--max-tokens", 12, "--temperature", 5, "--seed", 1, *cut]
    assert (
        generate(*loaded, [{"role": "user", "content": prompt}], max_tokens=12, temperature=5, seed=1)
        != greedy
    )
    result = run("generate", tiny_model_dir, "--prompt", prompt, *hot)
    assert result.exit_code == 0 and result.stdout == greedy + "\n", result.output
    result = run("chat", tiny_model_dir, *hot, input=prompt + "\n")
    assert result.exit_code == 0 and result.stdout == greedy + "\n", result.output
