"""Build real checkpoints with PyTorch for the converter tests: Meta folders (split into fairscale model-parallel
shards) from the reference model of tests/reference/meta_model.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from tests.reference.meta_model import ModelArgs as MetaArgs
from tests.reference.meta_model import Transformer

# fairscale's split axis per Meta tensor, written out here independently of the library's merge table
COLUMN_PARALLEL = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "feed_forward.w1",
    "feed_forward.w3",
    "output",
)
ROW_PARALLEL = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def meta_reference(params: dict, seed: int = 0) -> Transformer:
    """The PyTorch reference with random weights, norms included (so a wrong norm would show in the logits)."""
    torch.manual_seed(seed)
    model = Transformer(MetaArgs(**params, max_seq_len=64))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0.0, 0.08)
    return model.eval()


def split_shards(state: dict[str, torch.Tensor], mp: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for name, tensor in state.items():
        stem = name.rsplit(".", 1)[0]
        if stem.endswith(COLUMN_PARALLEL):
            pieces = torch.chunk(tensor, mp, dim=0)
        elif stem.endswith(ROW_PARALLEL):
            pieces = torch.chunk(tensor, mp, dim=1)
        else:
            pieces = [tensor] * mp
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone().contiguous()
    return shards


def write_meta_folder(
    folder: Path,
    params: dict,
    state: dict[str, torch.Tensor],
    mp: int = 1,
    tokenizer_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    params_vocab: int = -1,
) -> Path:
    """params.json (vocab_size -1 as Meta ships it), consolidated.0k.pth shards, checklist.chk, tokenizer.model."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_params = {k: v for k, v in params.items() if k != "vocab_size"} | {"vocab_size": params_vocab}
    (folder / "params.json").write_text(json.dumps(meta_params))
    state = {name: tensor.detach().to(dtype) for name, tensor in state.items()}
    for index, shard in enumerate(split_shards(state, mp)):
        torch.save(shard, folder / f"consolidated.{index:02d}.pth")
    if tokenizer_dir is not None:
        shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    lines = [
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]
    (folder / "checklist.chk").write_text("\n".join(lines) + "\n")
    return folder
