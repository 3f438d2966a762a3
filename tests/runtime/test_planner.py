"""The memory planner's decisions for given budgets, on byte counts shaped like full-size Qwen-Image with FP8
weights (the transformer 25.4 GiB in 60 blocks, the text encoder 7.1 GiB in 28 layers, as the H100 plans in
bench/results/memory.json report)."""

from __future__ import annotations

import dataclasses

import pytest

from qimg.runtime.planner import (
    HEADROOM,
    Footprint,
    GiB,
    MiB,
    Needs,
    PlanError,
    TrainNeeds,
    plan_memory,
    plan_training,
    spread,
    suggest,
)

TRANSFORMER = Footprint(rest=int(0.08 * GiB), blocks=(int(0.422 * GiB),) * 60, act=int(1.0 * GiB))
TEXT_ENCODER = Footprint(rest=int(1.02 * GiB), blocks=(int(0.217 * GiB),) * 28, act=int(0.15 * GiB))
NEEDS = Needs(TRANSFORMER, Footprint(int(0.24 * GiB), (), int(2.6 * GiB)), int(1.2 * GiB), TEXT_ENCODER)


def test_spread_picks_evenly_spaced_distinct_blocks():
    assert spread(60, 0) == []
    assert spread(60, 60) == list(range(60))
    assert spread(6, 2) == [1, 4] and spread(6, 3) == [1, 3, 5]
    for k in range(1, 61):
        picked = spread(60, k)
        assert len(picked) == k and picked == sorted(set(picked)) and picked[-1] <= 59


def test_no_budget_or_a_large_one_keeps_everything_resident():
    for budget in (None, 80 * GiB):
        plan = plan_memory(NEEDS, budget=budget)
        assert plan.mode == "none" and not plan.streamed and not plan.vae_tiling
    assert plan.peak <= 80 * GiB - HEADROOM


@pytest.mark.parametrize("budget_gib, streamed_transformer, streamed_te", [(24, 10, 0), (12, 39, 0), (8, 48, 3)])
def test_budgets_stream_just_enough_blocks_and_fit(budget_gib, streamed_transformer, streamed_te):
    budget = budget_gib * GiB
    plan = plan_memory(NEEDS, budget=budget)
    assert plan.mode == "layer"
    assert len(plan.streamed["transformer"]) == streamed_transformer
    assert len(plan.streamed["text_encoder"]) == streamed_te
    assert plan.peak <= budget - HEADROOM
    assert plan.phases["denoise"] == {"transformer", "vae"} and plan.phases["text"] == {"text_encoder", "vae"}
    # The 1 MP decode (2.6 GiB) does not fit beside the resident blocks: the transformer leaves for it.
    assert plan.phases["vae"] == {"vae"} and not plan.vae_tiling


def test_more_budget_never_streams_more():
    counts = [len(plan_memory(NEEDS, budget=b * GiB).streamed.get("transformer", ())) for b in range(4, 40)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0


def test_model_offload_swaps_whole_components_when_each_fits():
    plan = plan_memory(NEEDS, budget=30 * GiB)
    assert plan.mode == "model" and plan.streamed == {"transformer": (), "text_encoder": ()}
    assert plan.phases["vae"] == {"vae", "transformer"}  # room for both: no re-upload after the decode
    with pytest.raises(PlanError, match="transformer"):
        plan_memory(NEEDS, budget=24 * GiB, mode="model")


def test_forced_modes_that_do_not_fit_say_what_they_need():
    with pytest.raises(PlanError, match=r"--offload none needs about 3\d\.\d GiB, more than a 24\.0 GiB budget"):
        plan_memory(NEEDS, budget=24 * GiB, mode="none")
    with pytest.raises(PlanError, match="--offload layer"):
        plan_memory(NEEDS, budget=2 * GiB)


def test_the_vae_tiles_when_a_whole_decode_does_not_fit():
    big = Needs(TRANSFORMER, Footprint(int(0.24 * GiB), (), int(10.4 * GiB)), int(1.3 * GiB), TEXT_ENCODER)  # 4 MP
    plan = plan_memory(big, budget=8 * GiB)
    assert plan.vae_tiling and "VAE tiled to fit the budget" in plan.notes
    assert plan.peaks["vae"] <= 8 * GiB - HEADROOM
    assert not plan_memory(big, budget=None).vae_tiling  # no budget: nothing to fit


def test_text_encoder_on_the_cpu_or_absent_frees_the_text_phase():
    on_cpu = plan_memory(NEEDS, budget=8 * GiB, text_encoder_device="cpu")
    assert "text_encoder" not in on_cpu.streamed and "text" not in on_cpu.peaks
    embeds_only = Needs(NEEDS.transformer, NEEDS.vae, NEEDS.vae_tiled_act, None)
    resident = plan_memory(embeds_only, budget=34 * GiB)
    assert resident.mode == "none"  # 25.4 + 0.24 + 2.6 GiB fit once the 7.1 GiB encoder is not needed


def test_describe_says_what_streams_and_the_expected_peak():
    plan = plan_memory(NEEDS, budget=12 * GiB)
    text = "\n".join(plan.describe(NEEDS))
    assert "offload layer, VRAM budget 12.0 GiB" in text
    assert "21 of 60 blocks resident, 39 streamed" in text
    assert f"expected peak {plan.peak / GiB:.1f} GiB" in text


def test_suggest_names_flags_that_fit_the_free_memory():
    assert suggest(NEEDS, 30 * GiB, fp8=True) == "try: --offload model --vram-budget 30"
    assert suggest(NEEDS, 10 * GiB, fp8=False) == "try: --offload layer --fp8 weights --vram-budget 10"
    assert "smaller --width/--height" in suggest(NEEDS, 1 * GiB, fp8=True)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="offload mode"):
        plan_memory(NEEDS, budget=None, mode="disk")


# -- training ---------------------------------------------------------------------------------------------------

def _train_needs(blocks: int = 10, block: int = GiB, saved: int = 512 * MiB) -> TrainNeeds:
    return TrainNeeds(weights=Footprint(rest=GiB, blocks=(block,) * blocks), saved=saved, inputs=32 * MiB,
                      work=saved + 256 * MiB, adapters=256 * MiB)


def test_training_keeps_everything_resident_and_uncheckpointed_when_it_fits():
    plan = plan_training(_train_needs(), budget=None)
    assert plan.streamed == () and plan.checkpointed == ()
    plan = plan_training(_train_needs(), budget=40 * GiB)
    assert plan.streamed == () and plan.checkpointed == () and plan.peak + HEADROOM <= 40 * GiB


def test_training_checkpoints_the_fewest_blocks_that_fit_then_all_then_streams():
    needs = _train_needs()
    full = plan_training(needs, budget=None).peak
    budget = full + HEADROOM - 3 * (512 - 32) * MiB - 1  # three checkpointed blocks are not quite enough
    plan = plan_training(needs, budget=budget)
    assert len(plan.checkpointed) == 4 and plan.streamed == () and plan.peak + HEADROOM <= budget
    assert plan.checkpointed == tuple(spread(10, 4))  # spread out, not the first four
    every = plan_training(needs, budget=None, checkpointing=True).peak
    plan = plan_training(needs, budget=every + HEADROOM)
    assert plan.checkpointed == tuple(range(10)) and plan.streamed == ()
    plan = plan_training(needs, budget=every + HEADROOM - GiB // 2)  # half a block short: stream some
    assert plan.checkpointed == tuple(range(10)) and plan.peak + HEADROOM <= every + HEADROOM - GiB // 2
    # Two device slots cost two blocks, so freeing half a block takes streaming three of them.
    assert len(plan.streamed) == 3
    assert "3 blocks stream" in "\n".join(plan.describe(needs))


def test_training_plan_forced_checkpointing_and_its_errors():
    needs = _train_needs()
    assert plan_training(needs, budget=None, checkpointing=True).checkpointed == tuple(range(10))
    assert plan_training(needs, budget=None, checkpointing=False).checkpointed == ()
    with pytest.raises(PlanError, match="without gradient checkpointing.*drop --no-checkpointing"):
        plan_training(needs, budget=12 * GiB, checkpointing=False)
    with pytest.raises(PlanError, match="with every block streamed, more than a 3.0 GiB budget"):
        plan_training(needs, budget=3 * GiB)
    tight = plan_training(needs, budget=6 * GiB)  # rest + 2 slots + the step's own needs fit: all but some stream
    assert tight.peak + HEADROOM <= 6 * GiB and len(tight.streamed) >= 8


def test_training_plan_for_the_full_qwen_image_at_1024():
    """The released model's sizes (60 blocks, 38.1 GiB in bf16, 20.5 GiB with FP8 linears): an 80 GB card trains
    it resident; 24 GiB needs streaming in bf16 and a few streamed blocks with FP8 weights; 16 GiB still fits."""
    copy = 4224 * 3072 * 2
    bf16 = TrainNeeds(Footprint(rest=600 * MiB, blocks=(int(0.64 * GiB),) * 60), 22 * copy, copy,
                      22 * copy + 16 * copy, 16 * 106_000_000)
    fp8 = dataclasses.replace(bf16, weights=Footprint(rest=600 * MiB, blocks=(int(0.33 * GiB),) * 60))
    assert plan_training(bf16, budget=80 * GiB).checkpointed == ()
    assert 0 < len(plan_training(bf16, budget=70 * GiB).checkpointed) < 60
    plan = plan_training(bf16, budget=24 * GiB)
    assert plan.peak + HEADROOM <= 24 * GiB and len(plan.streamed) > 20
    plan8 = plan_training(fp8, budget=24 * GiB)
    assert plan8.peak + HEADROOM <= 24 * GiB and len(plan8.streamed) < len(plan.streamed)
    assert plan_training(fp8, budget=16 * GiB).streamed
