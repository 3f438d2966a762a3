"""Gradient checkpointing applied from outside: a block keeps only its inputs in the forward pass and recomputes
its activations during backward, trading about one more forward per step for the activation memory of all but
one block (the full-size Qwen-Image MMDiT's 60 blocks hold tens of GiB of activations at 1024x1024).

Applied by replacing each block instance's forward, so module names (and the LoRA adapters and state keys that
use them) stay as they are. Non-reentrant checkpointing: keyword and non-tensor arguments pass through, and
recomputation runs the same operations, so results do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block's forward (in place); returns the count. Blocks already checkpointed are left as
    they are."""
    count = 0
    for block in blocks:
        if is_checkpointed(block):
            continue
        block.forward = functools.partial(_checkpointed, block.forward)  # type: ignore[method-assign]
        count += 1
    return count


def is_checkpointed(block: nn.Module) -> bool:
    forward = block.forward
    return isinstance(forward, functools.partial) and forward.func is _checkpointed


def wrap_inside(block: nn.Module, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace a block's forward with wrap(forward), inside its checkpoint if it has one, so that the
    recomputation during backward runs the wrapper too (block streaming binds the block's weights there)."""
    forward = block.forward
    if is_checkpointed(block):
        block.forward = functools.partial(_checkpointed, wrap(forward.args[0]))  # type: ignore[method-assign, union-attr]
    else:
        block.forward = wrap(forward)  # type: ignore[method-assign]
