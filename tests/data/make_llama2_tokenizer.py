"""Rebuild Llama 2's 32000-piece sentencepiece `tokenizer.model` from the vocabulary and merge list that the npm
package llama-tokenizer-js 1.2.2 (`llama-tokenizer.js`) embeds, with no network and no Meta download.

    python tests/data/make_llama2_tokenizer.py path/to/llama-tokenizer.js out.model && gzip -9 out.model

Pieces keep their ids; a merged piece scores minus the rank of its merge (sentencepiece's BPE applies the
highest-scoring merge first, the order the merge list gives); normalizer and specials are Llama 2's. The result
reproduces the package's own known-answer ids (checked in tests/test_chat_template.py).
"""

from __future__ import annotations

import base64
import re
import struct
import sys

import sentencepiece.sentencepiece_model_pb2 as pb


def main(source_path: str, out_path: str) -> None:
    source = open(source_path, encoding="utf-8").read()
    vocab = (
        base64.b64decode(re.search(r'llama_vocab_base64 = "([^"]+)"', source).group(1)).decode().split("\n")
    )
    packed = base64.b64decode(re.search(r'llama_merges_binary = "([^"]+)"', source).group(1))
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    rank: dict[str, int] = {}
    for index in range(0, len(ids), 2):
        rank.setdefault(vocab[ids[index]] + vocab[ids[index + 1]], index // 2)
    model = pb.ModelProto()
    piece_type = pb.ModelProto.SentencePiece
    for token_id, text in enumerate(vocab):
        piece = model.pieces.add(piece=text, score=0.0)
        if token_id == 0:
            piece.type = piece_type.UNKNOWN
        elif token_id in (1, 2):
            piece.type = piece_type.CONTROL
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            piece.type = piece_type.BYTE
        else:
            piece.type, piece.score = piece_type.NORMAL, -float(rank.get(text, len(ids)))
    trainer = model.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = pb.TrainerSpec.BPE, len(vocab), True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    open(out_path, "wb").write(model.SerializeToString())


if __name__ == "__main__":
    main(*sys.argv[1:3])
