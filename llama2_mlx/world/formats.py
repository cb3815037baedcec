"""The world's dialogs in DESIGN.md's data formats, plus plain-text transcripts and held-out eval records.

Held-out record: `{"messages": [system?, first user message], "skill", "check", "style"?, "follow_ups"?}` where
each follow-up is `{"content": later user message, "skill", "check"}`. The evaluator answers the first message,
then feeds its own answer back before each follow-up, so a style can be scored at every turn.
"""

from __future__ import annotations

from typing import Any

from llama2_mlx.world.dialogs import Dialog


def messages_record(dialog: Dialog) -> dict[str, Any]:
    """SFT chat format: the whole dialog."""
    return {"messages": dialog.messages()}


def prompt_completion_record(dialog: Dialog) -> dict[str, Any]:
    """SFT prompt/completion format: the first question and its answer (system prompts do not fit this format)."""
    return {"prompt": dialog.tasks[0].question, "completion": dialog.answers[0]}


def text_record(dialog: Dialog) -> dict[str, Any]:
    """SFT text format: the dialog as a plain transcript."""
    return {"text": transcript(dialog)}


def prompt_record(dialog: Dialog) -> dict[str, Any]:
    """A prompt to answer (rejection sampling, PPO): the dialog up to its last user message, with the last
    question's `check` data and the dialog's `style` (sampling ignores both; `annotate` judges answers by them)."""
    messages = dialog.messages()[:-1]
    record: dict[str, Any] = (
        {"prompt": messages[0]["content"]} if len(messages) == 1 else {"messages": messages}
    )
    record["check"] = dialog.tasks[-1].check
    if dialog.style is not None:
        record["style"] = dialog.style
    return record


def heldout_record(dialog: Dialog) -> dict[str, Any]:
    """What the evaluator needs: the opening prompt, then each later question with its check data."""
    first = dialog.tasks[0]
    record: dict[str, Any] = {"messages": dialog.messages(1)[:-1], "skill": first.skill, "check": first.check}
    if dialog.style is not None:
        record["style"] = dialog.style
    if len(dialog.tasks) > 1:
        record["follow_ups"] = [
            {"content": task.question, "skill": task.skill, "check": task.check} for task in dialog.tasks[1:]
        ]
    return record


def transcript(dialog: Dialog) -> str:
    """One line of plain text: "System: ... User: ... Assistant: ..." (the pretraining corpus's dialogs)."""
    parts = [f"System: {dialog.system}"] if dialog.system else []
    for task, answer in zip(dialog.tasks, dialog.answers, strict=True):
        parts += [f"User: {task.question}", f"Assistant: {answer}"]
    return " ".join(parts)
