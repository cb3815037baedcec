"""`convert` and `export`: checkpoints into MLX model folders and back to Hugging Face folders."""

from __future__ import annotations

import click

QUANTIZE_CHOICES = click.Choice(["4", "8"])
DTYPE_CHOICES = click.Choice(["float16", "bfloat16", "float32"])


def _size(nbytes: int) -> str:
    value = float(nbytes)  # decimal units, as file managers and `ls -h --si` show them
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option(
    "--dtype", type=DTYPE_CHOICES, default=None, help="Weight dtype on disk (default: the checkpoint's)."
)
@click.option(
    "--quantize", type=QUANTIZE_CHOICES, default=None, help="Store MLX affine-quantized weights (bits)."
)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Quantization group size (default: 64, or the largest that divides the model's layer widths).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--verify", is_flag=True, help="Check Meta's checklist.chk md5 sums first.")
def convert_command(src: str, dst: str, dtype, quantize, group_size, force: bool, verify: bool) -> None:
    """Convert a Meta folder, a Hugging Face folder or a hub id (org/name) into an MLX model folder DST."""
    from llama2_mlx.checkpoints.convert import convert
    from llama2_mlx.progress import Progress

    progress = Progress("converting", " MB", scale=10**6)
    try:
        result = convert(src, dst, dtype=dtype, quantize=int(quantize) if quantize else None,
                         group_size=int(group_size) if group_size else None, force=force, verify=verify, progress=progress.tensor)  # fmt: skip
    finally:
        progress.close()
    quantized = (
        f", {result.quantization['bits']}-bit groups of {result.quantization['group_size']}"
        if result.quantization
        else ""
    )
    if result.quantization and group_size is None and result.quantization["group_size"] != 64:
        click.echo(f"note: group size 64 does not divide this model's layer widths; "
                   f"used {result.quantization['group_size']}", err=True)  # fmt: skip
    click.echo(
        f"wrote {result.path}: {result.parameters:,} parameters, {result.dtype}{quantized}, "
        f"{_size(result.bytes_on_disk)} on disk, {result.seconds:.1f} s"
    )


@click.command("export")
@click.argument("model", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--format", "format_", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="Output format (hf: a Hugging Face transformers folder).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def export_command(model: str, dst: str, format_: str, force: bool) -> None:
    """Export the MLX model folder MODEL as a Hugging Face folder DST (quantized weights are dequantized)."""
    from llama2_mlx.checkpoints.export import export
    from llama2_mlx.progress import Progress

    progress = Progress("exporting", " MB", scale=10**6)
    try:
        path = export(model, dst, format=format_, force=force, progress=progress.tensor)
    finally:
        progress.close()
    click.echo(f"wrote {path}")


COMMANDS: list[click.Command] = [convert_command, export_command]
