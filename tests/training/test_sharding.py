"""When train-lora shards the frozen base (training/sharding.py), decided without loading anything: asked for,
refused (one process, uneven micro-batches, FP8 weights), or chosen by the memory plan."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import qimg
from qimg import families
from qimg.errors import GPUMemoryError
from qimg.runtime.planner import Footprint, TrainNeeds, TrainPlan
from qimg.training.memory import training_plan
from qimg.training.sharding import plan_sharding, sharded_needs
from qimg.training.trainer import train_items
from tests.training.test_trainer import _config, _dataset

NEEDS = TrainNeeds(Footprint(rest=10, blocks=(40, 40, 40), act=5), saved=7, inputs=3, work=11, adapters=2)


def _planner(streams: bool, sharded_fits: bool = True
             ) -> tuple[list[int], Callable[[int], tuple[TrainPlan, TrainNeeds]]]:
    asked: list[int] = []

    def plan_for(shards: int) -> tuple[TrainPlan, TrainNeeds]:
        asked.append(shards)
        if shards > 1 and not sharded_fits:
            raise GPUMemoryError("sharded, it still does not fit")
        streamed = (0, 1) if streams and shards == 1 else ()
        return TrainPlan(None, streamed, (), 0, 3), NEEDS

    return asked, plan_for


def test_sharded_needs_hold_a_share_of_every_block_and_two_whole_blocks_at_work() -> None:
    needs = sharded_needs(NEEDS, 4)
    assert needs.weights.blocks == (10, 10, 10)
    assert needs.weights.rest == 10 + 3  # whole (gathered by the root through a step) and its share
    assert needs.work == 11 + 2 * 40
    assert (needs.saved, needs.inputs, needs.adapters) == (7, 3, 2)  # activations and adapters are per rank


@pytest.mark.parametrize(("shard", "ranks", "streams", "accum", "want"), [
    (True, 2, False, 2, [2]),  # asked for: sharded even when the whole base fits
    (False, 2, True, 2, [1]),  # never: blocks stream instead
    (None, None, True, 2, [1]),  # one process: nothing to shard over
    (None, 2, False, 2, [1]),  # the base fits each GPU: a copy per rank
    (None, 2, True, 2, [1, 2]),  # it fits only by streaming: sharded
])
def test_which_runs_shard(tiny_qwen: Path, shard: bool | None, ranks: int | None, streams: bool, accum: int,
                          want: list[int], tmp_path: Path) -> None:
    asked, plan_for = _planner(streams)
    config = _config(tiny_qwen, tmp_path, shard_base=shard, grad_accum=accum)
    _, _, sharded = plan_sharding(config, ranks, plan_for)
    assert asked == want and sharded == (want[-1] > 1)


def test_an_unsharded_plan_says_why_it_streams(tiny_qwen: Path, tmp_path: Path) -> None:
    for config, fits, why in ((_config(tiny_qwen, tmp_path, grad_accum=3), True, "--grad-accum 3 is not a multiple"),
                              (_config(tiny_qwen, tmp_path, grad_accum=2), False, "still does not fit")):
        _, plan_for = _planner(True, sharded_fits=fits)
        plan, _, sharded = plan_sharding(config, 2, plan_for)
        assert not sharded and plan.streamed and why in plan.notes[-1]


def test_sharding_is_refused_alone_and_with_uneven_micro_batches(tiny_qwen: Path, tmp_path: Path) -> None:
    _, plan_for = _planner(False)
    with pytest.raises(qimg.UsageError, match="torchrun job; this is one process"):
        plan_sharding(_config(tiny_qwen, tmp_path, shard_base=True), None, plan_for)
    with pytest.raises(qimg.UsageError, match="multiple of the 2 processes") as e:
        plan_sharding(_config(tiny_qwen, tmp_path, shard_base=True, grad_accum=3), 2, plan_for)
    assert "--grad-accum 4" in e.value.hint


def test_fp8_weights_are_not_sharded(tiny_qwen: Path, tmp_path: Path) -> None:
    config = _config(tiny_qwen, _dataset(tmp_path / "data", n=1))
    ref = qimg.resolve_model(str(tiny_qwen))
    family = families.get(ref.spec.family)
    items = train_items(config, ref)
    options = qimg.RuntimeOptions(device="cpu", dtype="float32", fp8="weights")
    with pytest.raises(qimg.UsageError, match="cannot shard FP8 weights"):
        training_plan(ref, family, config, options, items, shards=2)
    plan, _ = training_plan(ref, family, config, options.replace(fp8=None), items, shards=2)
    assert any("sharded over 2 processes" in note for note in plan.notes)
