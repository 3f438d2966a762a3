"""The memory planner's decisions for given budgets, on byte counts shaped like full-size Qwen-Image with FP8
weights (the transformer 25.4 GiB in 60 blocks, the text encoder 7.1 GiB in 28 layers, as the H100 plans in
bench/results/memory.json report)."""

from __future__ import annotations

import pytest

from qimg.runtime.planner import HEADROOM, Footprint, GiB, Needs, PlanError, plan_memory, spread, suggest

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
