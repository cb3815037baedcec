"""Training a sentencepiece BPE tokenizer with Llama 2's settings (the demo model's and the tests' tokenizers)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError


def train_tokenizer(
    corpus: str | os.PathLike | Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> Path:
    """Train BPE with digits split, byte fallback, UNK 0 / BOS 1 / EOS 2 and no pad; write out_dir/tokenizer.model.

    `corpus` is a text file (one sentence a line) or an iterable of sentences.
    """
    import sentencepiece as spm

    if vocab_size < 259 + 4:
        raise Llama2MLXError(f"vocab size {vocab_size} is too small: byte fallback alone needs 256 + 3 ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(corpus, str | os.PathLike):
        path = Path(corpus)
        if not path.is_file():
            raise Llama2MLXError(f"{path}: corpus file not found")
        source = {"input": str(path)}
    else:
        source = {"sentence_iterator": iter(list(corpus))}
    model = io.BytesIO()
    try:
        _train(spm, source, model, vocab_size)
    except RuntimeError as error:  # e.g. a vocabulary too small for the corpus's characters, or too large
        reason = str(error).splitlines()[-1].split("] ")[-1]
        name = corpus if isinstance(corpus, str | os.PathLike) else "corpus"
        raise Llama2MLXError(f"{name}: cannot train {vocab_size} pieces: {reason}") from None
    target = out / "tokenizer.model"
    tmp = target.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(target)
    return target


def _train(spm, source: dict, model: io.BytesIO, vocab_size: int) -> None:
    """Llama 2's trainer settings (its tokenizer.model's trainer_spec), character coverage 1.0 for small corpora."""
    spm.SentencePieceTrainer.train(
        **source,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=16384,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
