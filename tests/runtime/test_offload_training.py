"""Block streaming through forward and backward (LoRA training) on the CPU: gradients equal those of the resident
model, the visit order (forward, then reverse during recomputation), and the guards (streamed blocks must be
checkpointed; a pass that stopped part way, or a no-grad pass in between, restarts cleanly)."""

from __future__ import annotations

import pytest
import torch

from qimg.runtime.checkpoint import checkpoint_blocks
from qimg.runtime.lora import attach_lora, trainable_lora
from qimg.runtime.offload import Offloaded
from tests.runtime.test_offload import CPU, _inputs, _model

TARGETS = ("attn.to_q", "attn.add_v_proj", "img_mlp.net.2")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    adapters = {}
    for i in range(len(model.transformer_blocks)):
        for t in TARGETS:
            linear = model.get_submodule(f"transformer_blocks.{i}.{t}")
            adapters[f"transformer_blocks.{i}.{t}"] = (torch.randn(2, linear.in_features, generator=gen) * 0.1,
                                                       torch.randn(linear.out_features, 2, generator=gen) * 0.1, 1.0)
    with torch.inference_mode(False):
        attach_lora(model, "t", adapters, dtype=torch.float32)
    return trainable_lora(model, "t")


def _grads(model, params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, txt, t, rope = _inputs()
    with torch.enable_grad():
        loss = model(x, txt, t, rope).square().mean()
        loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("streamed", [[1], [0, 2], [0, 1, 2, 3]])
def test_streamed_training_gives_exactly_the_resident_gradients(streamed, one_thread):
    resident = _model()
    want_loss, want = _grads(resident, _trainable(resident))
    model = _model()
    params = _trainable(model)
    checkpoint_blocks(model.transformer_blocks)
    off = Offloaded(model, CPU, model.transformer_blocks, slots=2)
    off.log.enabled = True
    off.stream(streamed, backward=True)
    off.to_device()
    for _ in range(2):  # the second step runs on the copies prefetched across the step boundary
        loss, got = _grads(model, params)
        assert torch.equal(loss, want_loss)
        assert all(torch.equal(got[k], want[k]) for k in want)
    runs = [block for what, block, _ in off.log.events if what == "run"]
    assert runs == 2 * (streamed + streamed[::-1])
    copies = [block for what, block, _ in off.log.events if what == "copy"]
    assert copies[:len(runs)] == runs  # every block copied in once per visit, in visit order


def test_streaming_in_training_needs_checkpointed_blocks():
    model = _model()
    off = Offloaded(model, CPU, model.transformer_blocks)
    with pytest.raises(ValueError, match="without gradient checkpointing"):
        off.stream([1], backward=True)


def test_a_no_grad_pass_and_an_abandoned_pass_between_steps_keep_the_gradients(one_thread):
    resident = _model()
    params_r = _trainable(resident)
    want_loss, want = _grads(resident, params_r)
    x, txt, t, rope = _inputs()
    with torch.no_grad():
        want_out = resident(x, txt, t, rope)
    model = _model()
    params = _trainable(model)
    checkpoint_blocks(model.transformer_blocks)
    off = Offloaded(model, CPU, model.transformer_blocks, slots=2)
    off.stream([0, 3], backward=True)
    off.to_device()
    with torch.no_grad():  # a sample image between steps: forward visits only
        assert torch.equal(model(x, txt, t, rope), want_out)
    _grads(model, params)
    with torch.enable_grad():
        model(x, txt, t, rope)  # a forward whose backward never runs: the next pass starts over
    loss, got = _grads(model, params)
    assert torch.equal(loss, want_loss) and all(torch.equal(got[k], want[k]) for k in want)
