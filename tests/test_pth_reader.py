"""The torch-free .pth reader: exact values for every float dtype and for strided/offset views, and refusal of
pickles that would run code (the payload must never execute)."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest
import torch

from llama2_mlx.checkpoints.pth import read_pth
from llama2_mlx.errors import Llama2MLXError


def _as_float32(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reads_every_float_dtype_bit_exact(tmp_path, dtype):
    torch.manual_seed(0)
    tensor = torch.randn(5, 7).to(dtype)
    torch.save({"w": tensor}, tmp_path / "x.pth")
    table = read_pth(tmp_path / "x.pth")
    assert table["w"].shape == (5, 7)
    loaded = table["w"].load()
    assert (
        loaded.dtype
        == {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[dtype]
    )
    np.testing.assert_array_equal(_as_float32(loaded), tensor.float().numpy())


def test_views_honour_offset_shape_and_strides(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    views = {
        "transposed": base.t(),  # strides (1, 10)
        "sliced": base[2:5, 3:9],  # storage offset 23, non-contiguous rows
        "flat_tail": base.view(-1)[41:50],
        "stepped": base[::2, ::3],
    }
    torch.save(views, tmp_path / "views.pth")  # all four share one storage
    table = read_pth(tmp_path / "views.pth")
    for name, view in views.items():
        np.testing.assert_array_equal(_as_float32(table[name].load()), view.numpy(), err_msg=name)


def test_state_dict_with_metadata_and_parameters(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    torch.save(layer.state_dict(), tmp_path / "sd.pth")  # an OrderedDict with a _metadata attribute
    torch.save({"p": torch.nn.Parameter(torch.ones(4)), "step": 7}, tmp_path / "p.pth")
    table = read_pth(tmp_path / "sd.pth")
    np.testing.assert_array_equal(_as_float32(table["weight"].load()), layer.weight.detach().numpy())
    np.testing.assert_array_equal(_as_float32(table["bias"].load()), layer.bias.detach().numpy())
    assert list(read_pth(tmp_path / "p.pth")) == ["p"]  # the integer is not a tensor


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replace_pickle(path, payload: bytes) -> None:
    """Rewrite a real torch.save archive with another data.pkl, keeping every other member."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    members[name] = payload
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2)}, path)
    _replace_pickle(path, pickle.dumps({"w": _Payload(marker)}, protocol=2))
    with pytest.raises(Llama2MLXError, match=r"evil\.pth: refused to load global 'posix\.system'"):
        read_pth(path)
    assert not marker.exists()
    # the payload really does run under plain pickle: the test would catch a reader that used it
    with zipfile.ZipFile(path) as archive:
        pickle.load(io.BytesIO(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))))
    assert marker.exists()


def test_torch_load_from_bytes_is_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path)
    payload = b"\x80\x02ctorch.storage\n_load_from_bytes\nq\x00C\x00\x85q\x01Rq\x02."
    _replace_pickle(path, payload)
    with pytest.raises(Llama2MLXError, match="refused to load global 'torch.storage._load_from_bytes'"):
        read_pth(path)


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(Llama2MLXError, match=r"cut\.pth: not a readable PyTorch zip checkpoint .*truncated"):
        read_pth(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n")
    with pytest.raises(Llama2MLXError, match=r"text\.pth: not a readable PyTorch zip checkpoint"):
        read_pth(tmp_path / "text.pth")


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"w": torch.ones(3)}, path)
    _replace_pickle(path, b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01")  # stops mid-stream
    with pytest.raises(Llama2MLXError, match=r"x\.pth: corrupt pickle in .*data\.pkl"):
        read_pth(path)


def test_tensor_reaching_past_its_storage(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"w": torch.ones(6)}, path)
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        original = archive.read(name)
    # a pickle that claims 600 elements over the 6-element storage
    _replace_pickle(path, original.replace(b"K\x06\x85", b"MX\x02\x85"))
    with pytest.raises(
        Llama2MLXError, match=r"x\.pth: tensor 'w' of shape \(600,\) reaches past its storage"
    ):
        read_pth(path)
