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
        forward = block.forward
        if isinstance(forward, functools.partial) and forward.func is _checkpointed:
            continue
        block.forward = functools.partial(_checkpointed, forward)  # type: ignore[method-assign]
        count += 1
    return count
