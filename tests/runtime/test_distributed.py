"""Which torchrun process this is, and its device (BatchShard runs for real in tests/cli/test_data_parallel.py)."""

from __future__ import annotations

import pytest

from qimg.runtime.distributed import World, local_device, world_from_env


def test_world_from_torchrun_environment() -> None:
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}).leader  # type: ignore[union-attr]


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "1", "RANK": "0"}, {"WORLD_SIZE": "x"}])
def test_no_world_outside_torchrun_or_alone(env: dict[str, str]) -> None:
    assert world_from_env(env) is None


def test_device_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    world = World(5, 8, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device(world, None) == "cuda:1"
    assert local_device(world, "cuda") == "cuda:1"
    assert local_device(world, "cuda:3") == "cuda:3"  # asked for explicitly: kept
    assert local_device(world, "cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(world, None) is None  # no GPU: the usual default (the CPU)
