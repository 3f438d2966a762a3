"""The parallel safetensors reader gives exactly the tensors safetensors itself reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qimg.errors import CheckpointError
from qimg.loading.reader import Reader, file_entries


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(37, 19, generator=g).bfloat16(),
        "f16": torch.randn(5, 3, 2, generator=g).half(),
        "f32": torch.randn(1000, generator=g),  # 4000 bytes: many 64-byte chunks below
        "fp8": torch.randn(17, 9, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.arange(7),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    items = list(_tensors().items())
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file(dict(items[:4]), str(paths[0]), metadata={"format": "pt"})
    save_file(dict(items[4:]), str(paths[1]))
    return paths


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_reads_equal_safetensors(shards: list[Path], staged: bool) -> None:
    entries = {k: e for p in shards for k, e in file_entries(p).items()}
    assert set(entries) == set(_tensors())
    # chunk 64 bytes: staged reads cross many chunk boundaries and reuse both buffers
    with Reader("cpu", threads=3, chunk=64, staged=staged) as reader:
        got = dict(zip(entries, reader.read(list(entries.values())), strict=True))
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                want = f.get_tensor(key)
                assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
                assert torch.equal(got[key].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key


def test_truncated_file_is_a_checkpoint_error(shards: list[Path]) -> None:
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="past the end"):
        file_entries(shards[0])


def test_file_shrunk_after_its_header_was_read(shards: list[Path]) -> None:
    entries = file_entries(shards[0])
    shards[0].write_bytes(shards[0].read_bytes()[:-10])
    with Reader("cpu", threads=2) as reader, pytest.raises(CheckpointError, match="ended early"):
        reader.read(list(entries.values()))


def test_not_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        file_entries(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reads_into_gpu_memory(shards: list[Path]) -> None:
    entries = {k: e for p in shards for k, e in file_entries(p).items()}
    with Reader("cuda", threads=3, chunk=64) as reader:  # pinned buffers, side streams, many chunks
        got = dict(zip(entries, reader.read(list(entries.values())), strict=True))
    want = _tensors()
    for key, tensor in got.items():
        assert tensor.is_cuda and tensor.dtype == want[key].dtype, key
        assert torch.equal(tensor.cpu().reshape(-1).view(torch.uint8), want[key].reshape(-1).view(torch.uint8)), key


def test_loading_threads_hand_the_gil_back_quickly(shards: list[Path]) -> None:
    """Starting the readers lowers CPython's 5 ms switch interval (torch calls on the main thread otherwise wait
    that long for the GIL after each op while a loading thread runs Python), and keeps a program's own choice."""
    import sys

    from qimg.loading.reader import DEFAULT_SWITCH_INTERVAL, SWITCH_INTERVAL

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL)
        with Reader("cpu"):
            pass
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
        sys.setswitchinterval(0.002)
        with Reader("cpu"):
            pass
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
