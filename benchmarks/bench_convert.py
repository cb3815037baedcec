"""Converting a multi-shard Meta checkpoint: our streaming converter vs loading everything, peak RSS and GB/s.

    python benchmarks/bench_convert.py [--dim 2048 --layers 8 --mp 2 --workdir /tmp]

Builds a synthetic bf16 Meta checkpoint (params.json + consolidated.0k.pth, >= 1 GB by default) with torch, then
converts it in child processes, one per approach, each reporting its own peak resident memory (VmHWM of
/proc/self/status; ru_maxrss would also count the parent's memory at fork, which Linux carries across exec):
  - ours: tensors stream in blocks of rows into shards laid out up front, so the peak is a few blocks whatever
    the shard size (run with the default 2 GB shards and with 64 MB shards to show it);
  - "load everything": torch.load every shard (what Hugging Face's convert_llama_weights_to_hf.py does), merge and
    permute in memory, one safetensors save_file.
Also measured: the child's baseline (Python + MLX + our imports). Everything it writes is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")  # fairscale split axis 0; wo, w2, embeddings on 1


def build_checkpoint(
    folder: Path, dim: int, layers: int, heads: int, kv_heads: int, vocab: int, mp: int
) -> int:
    """A random bf16 Meta checkpoint split into `mp` shards, built one layer at a time; returns its bytes."""
    import torch

    from llama2_mlx.config import ffn_hidden_dim

    torch.manual_seed(0)
    hidden, head_dim = ffn_hidden_dim(dim, 256), dim // heads
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(layers):
        shapes |= {
            f"layers.{i}.attention.wq.weight": (heads * head_dim, dim),
            f"layers.{i}.attention.wk.weight": (kv_heads * head_dim, dim),
            f"layers.{i}.attention.wv.weight": (kv_heads * head_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, heads * head_dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        }
    shards: list[dict] = [{} for _ in range(mp)]
    for name, shape in shapes.items():
        tensor = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        kind = name.split(".")[-2]
        pieces = (
            [tensor] * mp
            if len(shape) == 1
            else torch.chunk(tensor, mp, dim=0 if kind in COLUMN_PARALLEL else 1)
        )
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone()
    params = {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads, "multiple_of": 256,
              "norm_eps": 1e-5, "vocab_size": -1}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    for index, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{index:02d}.pth")
    return sum(p.stat().st_size for p in folder.glob("consolidated.*.pth"))


# --- what each child process runs ---------------------------------------------------------------------------


def child_ours(src: str, dst: str, shard_bytes: str) -> None:
    from llama2_mlx.checkpoints.convert import convert

    kwargs = {"max_shard_bytes": int(shard_bytes)} if shard_bytes != "default" else {}
    convert(src, dst, **kwargs)


def child_load_everything(src: str, dst: str) -> None:
    """torch.load all shards fully, merge + permute every tensor in memory, save everything at once."""
    import torch
    from safetensors.torch import save_file

    params = json.loads((Path(src) / "params.json").read_text())
    shards = [
        torch.load(p, map_location="cpu", weights_only=True)
        for p in sorted(Path(src).glob("consolidated.*.pth"))
    ]
    head_dim = params["dim"] // params["n_heads"]

    def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        return w.view(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    state = {}
    for name in shards[0]:
        kind = name.split(".")[-2]
        parts = [shard[name] for shard in shards]
        if parts[0].ndim == 1:
            merged = parts[0]
        else:
            merged = torch.cat(parts, dim=0 if kind in COLUMN_PARALLEL else 1)
        if kind in ("wq", "wk"):
            merged = permute(merged, params["n_heads"] if kind == "wq" else params["n_kv_heads"])
        state[name] = merged.contiguous()
    Path(dst).mkdir()
    save_file(state, str(Path(dst) / "model.safetensors"))


def child_baseline(library: str) -> None:
    """Only the imports, to separate each approach's constant from what it holds for the checkpoint."""
    if library == "torch":
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    else:
        import llama2_mlx.checkpoints.convert  # noqa: F401


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (VmHWM, in kB in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_child(*args: str) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of one child process running this script with --child ARGS."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr}")
    return int(done.stdout.split()[-1]) / 1e9, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--mp", type=int, default=2)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        children = {"ours": child_ours, "load-everything": child_load_everything, "baseline": child_baseline}
        children[opts.child[0]](*opts.child[1:])
        print(peak_rss_bytes())
        return

    from benchmarks.common import machine

    work = Path(tempfile.mkdtemp(prefix="bench_convert.", dir=opts.workdir))
    try:
        src = work / "meta"
        size = build_checkpoint(src, opts.dim, opts.layers, opts.heads, opts.kv_heads, opts.vocab, opts.mp)
        print(f"{machine()}")
        print(f"checkpoint: {size / 1e9:.2f} GB bf16, dim {opts.dim}, {opts.layers} layers, MP={opts.mp}")
        ours, everything = "ours (streaming, default 2 GB shards)", "load everything (torch.load all shards)"
        runs = {
            "ours: imports only": ("baseline", "ours"),
            ours: ("ours", str(src), str(work / "ours"), "default"),
            "ours with 64 MB output shards": ("ours", str(src), str(work / "ours-64mb"), str(64 * 2**20)),
            "torch: imports only": ("baseline", "torch"),
            everything: ("load-everything", str(src), str(work / "everything")),
        }
        results = {}
        for label, args in runs.items():
            results[label] = run_child(*args)
            for out in work.iterdir():  # keep disk use to one output at a time
                if out != src:
                    shutil.rmtree(out)
        print(f"{'approach':45s} {'peak RSS GB':>11s} {'% of ckpt':>9s} {'seconds':>8s} {'GB/s':>6s}")
        for label, (rss, seconds) in results.items():
            rate = "" if "imports only" in label else f"{size / 1e9 / seconds:6.2f}"
            print(f"{label:45s} {rss:11.2f} {100 * rss * 1e9 / size:8.0f}% {seconds:8.1f} {rate:>6s}")
        peak, seconds = results[ours][0], results[ours][1]
        print(
            f"peak RSS: load everything / ours = {results[everything][0] / peak:.1f}x; "
            f"ours = {100 * peak * 1e9 / size:.0f}% of the checkpoint; "
            f"ours minus its imports = {100 * (peak - results['ours: imports only'][0]) * 1e9 / size:.0f}%"
        )
        print(f"speed: ours / load everything = {results[everything][1] / seconds:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
