"""The one guard every training job puts around its --out folder: check, then claim and lock, only then write.

A job (sft, pretrain, train-rm, ...) validates its inputs first, then calls `claim_run_folder`, which:
- refuses an --out that is (or overlaps) one of the job's inputs, even with --force;
- takes the folder's lock (`destination.DestinationLock`): a second run on the same --out gets one line naming the
  pid that holds it, and the lock dies with its process, so a killed run leaves no stale claim;
- without --resume, accepts only a new or empty folder; --force starts over (the folder's contents are deleted);
- with --resume, needs the job's `<job>_config.json` (without a checkpoint yet, i.e. killed before its first,
  the run starts again at step 0), and refuses (one line naming them) any
  change to the fields the job lists as meaning-changing (they alter what the saved state means: LoRA rank, lr,
  data, ...); other changes (more --iters, report intervals, ...) are allowed and recorded in `resumes.jsonl`.
It writes nothing itself: the returned `RunFolder.callback` writes `<job>_config.json` (and the resume record)
from `Callback.on_start`, i.e. after `trainer.train` has loaded the checkpoint, so every refusal leaves the folder as
it was. Use it as a context manager (or call `release`) so the lock is dropped when the job ends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llama2_mlx.destination import DestinationLock, check_not_input, clean_stale_temporaries, remove
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import read_json, write_text_atomic
from llama2_mlx.trainer import CHECKPOINT_DIR, Callback

RESUMES_FILE = "resumes.jsonl"


class RunFolder:
    """A claimed, locked run folder; see the module docstring."""

    def __init__(self, out: Path, job: str, config: dict[str, Any], lock: DestinationLock, changes: dict):
        self.out, self.job, self.config, self.lock = out, job, config, lock
        self.changes = changes  # field -> [saved value, new value] of the allowed changes on --resume
        self.callback = _WriteConfig(self)

    @property
    def config_file(self) -> Path:
        return self.out / f"{self.job}_config.json"

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _WriteConfig(Callback):
    def __init__(self, run: RunFolder):
        self.run = run

    def on_start(self, step: int) -> None:
        run = self.run
        write_text_atomic(run.config_file, json.dumps(run.config, indent=2) + "\n")
        if run.changes:
            with (run.out / RESUMES_FILE).open("a") as file:
                file.write(json.dumps({"step": step, "changed": run.changes}) + "\n")


def claim_run_folder(
    out: str | os.PathLike,
    job: str,
    config: dict[str, Any],
    resume: bool,
    force: bool,
    meaning: Iterable[str],
    inputs: Iterable[str | os.PathLike | None] = (),
) -> RunFolder:
    """Claim `out` for `job` (call after every other check has passed); see the module docstring.

    `config`: what `<job>_config.json` will hold (the job's flags, plus e.g. `data_fingerprint`); `meaning`: its
    keys that --resume may not change; `inputs`: files and folders the job reads."""
    out = Path(out)
    if resume and force:
        raise Llama2MLXError("--resume continues the run in --out, --force starts it over: choose one")
    check_not_input(out, inputs)
    if os.path.lexists(out) and not out.is_dir():
        raise Llama2MLXError(f"{out}: exists and is not a folder; choose another --out")
    lock = DestinationLock(out).acquire()
    try:
        changes = _check(out, job, config, resume, force, list(meaning))
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out / CHECKPOINT_DIR)  # puts back a checkpoint a crash left only as .old
        for entry in out.iterdir():  # what a killed writer left: .model.<random>.tmp, .metrics.jsonl.tmp, ...
            if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
                remove(entry)
    except BaseException:
        lock.release()
        raise
    return RunFolder(out, job, config, lock, changes)


def _check(out: Path, job: str, config: dict, resume: bool, force: bool, meaning: list[str]) -> dict:
    config_file = out / f"{job}_config.json"
    state_file = out / CHECKPOINT_DIR / "trainer_state.json"
    visible = sorted(e.name for e in out.iterdir() if not e.name.startswith(".")) if out.is_dir() else []
    if resume:
        if not visible:  # killed before it wrote anything: --resume starts the run
            return {}
        if not config_file.is_file():
            raise Llama2MLXError(
                f"{out}: not a {job} run folder (no {config_file.name}); nothing to --resume"
            )
        saved = read_json(config_file, "--resume")
        if not isinstance(saved, dict):
            raise Llama2MLXError(f"{config_file}: expected a JSON object")
        changed = {
            key: [saved.get(key), config.get(key)] for key in config if saved.get(key) != config.get(key)
        }
        refused = [key for key in meaning if key in changed]
        if refused:
            listed = ", ".join(f"{key} ({changed[key][0]!r} -> {changed[key][1]!r})" for key in refused)
            raise Llama2MLXError(
                f"{out}: --resume with changed {listed}; this changes what the saved state means: use the "
                "saved values, --force to start over, or a new --out"
            )
        # without a checkpoint yet (killed before the first one) the same run starts again at step 0
        return {key: value for key, value in changed.items() if key not in ("resume", "force")}
    if visible and not force:
        if config_file.is_file() and state_file.is_file():
            raise Llama2MLXError(
                f"{out}: holds a {job} run with a checkpoint; use --resume to continue it, --force to start "
                "over, or a new --out"
            )
        listed = ", ".join(visible[:3]) + (", ..." if len(visible) > 3 else "")
        raise Llama2MLXError(
            f"{out}: already exists and is not empty ({listed}); use a new --out, or --force to replace its contents"
        )
    if force:
        for name in visible:
            remove(out / name)
    return {}


def continues_checkpoint(out: str | os.PathLike, resume: bool) -> bool:
    """What `TrainConfig.resume` must be: --resume and a checkpoint to load (a run killed before its first
    checkpoint has none, and --resume then starts it at step 0). Every rank can call it."""
    return resume and (Path(out) / CHECKPOINT_DIR / "trainer_state.json").is_file()


def fingerprint(*paths: str | os.PathLike | None) -> str:
    """SHA-256 over the bytes of these files (a folder: its files, sorted): detects data changed under --resume."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode() + b"\0")
            try:
                with file.open("rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                        digest.update(block)
            except OSError:
                digest.update(b"unreadable")
    return digest.hexdigest()
