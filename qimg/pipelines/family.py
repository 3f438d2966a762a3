"""The family record: what the generic machinery (memory planning, block-wise loading, offload, compile, the
VAE round trip) needs to know about one model family, as data and small functions. One instance per family
lives in qimg/families/; nothing under runtime/ or in the generic pipeline code names a family.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qimg.runtime.fp8 import Predicate

if TYPE_CHECKING:
    import torch

    from qimg.embeddings import EmbeddingsFile
    from qimg.runtime.modulation import ModulationSites
    from qimg.runtime.planner import Needs, TrainNeeds


@dataclass(frozen=True)
class BlockLists:
    """The repeated blocks of a network: named nn.ModuleList attributes, in the order the forward runs them
    (FLUX.1: double-stream blocks, then single-stream ones). A block's index is its position in that order
    across all lists; offload streams and the memory plan count blocks by it."""

    names: tuple[str, ...]

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        alternatives = "|".join(re.escape(n) for n in self.names)
        return re.compile(rf"({alternatives})\.(\d+)\.")

    def key(self, name: str) -> tuple[int, int] | None:
        """(list position, index in that list) of the block a parameter name belongs to, or None."""
        m = self._pattern.match(name)
        return None if m is None else (self.names.index(m.group(1)), int(m.group(2)))

    def prefix(self, name: str) -> str | None:
        """The block's module path ("transformer_blocks.3") of a parameter name, or None outside the blocks."""
        m = self._pattern.match(name)
        return None if m is None else m.group(0)[:-1]

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """Every block of `model`, in run order."""
        return [block for name in self.names for block in model.get_submodule(name)]

    def index(self, model: nn.Module, prefix: str) -> int:
        """The run-order index of the block at `prefix` (as `prefix()` gives it)."""
        list_name, _, i = prefix.rpartition(".")
        offset = sum(len(model.get_submodule(n)) for n in self.names[: self.names.index(list_name)])
        return offset + int(i)


# (folder, device, dtype, group=..., on_group=..., [weights=TransformerFile]) -> the network, loaded strictly (see
# loading.checkpoint). With weights (a single file, loading/single_file.py) the config still comes from `folder`;
# the FP8 linears the file stores and denoiser_fp8 selects load as nn.Linear holding e4m3 weights, which
# pipelines.memory then makes FP8 linears.
DenoiserLoader = Callable[..., nn.Module]
# (root, dtype, fp8 mode, task, request shape, weights=TransformerFile | None) -> what a run needs on the device.
NeedsEstimator = Callable[..., "Needs"]
# (ref, options, request, images, family=record) -> the prompt embeddings file, loading only the text encoder(s).
PromptEncoderFn = Callable[..., "EmbeddingsFile"]


@dataclass(frozen=True)
class Family:
    """One model family: its components and loaders, block lists, FP8 predicates, memory estimator, pipeline."""

    name: str
    pipeline: Any  # the pipeline class; Pipeline.load(ref, family, options, shape) builds one
    denoiser_folder: str  # the component folder of the denoising network ("transformer")
    load_denoiser: DenoiserLoader
    denoiser_blocks: BlockLists
    denoiser_fp8: Predicate  # which denoiser linears FP8 replaces (the rest stay in the compute dtype)
    text_encoder_fp8: Predicate  # the same for the text encoder(s) under --fp8 weights
    load_vae: Callable[[Path, torch.device, torch.dtype], nn.Module]  # vae/ folder -> the VAE, ready to run
    needs: NeedsEstimator
    encode_prompt: PromptEncoderFn
    # transformer/ folder (None: the released architecture) -> the denoiser's linears by name -> (out, in), read
    # from its config on the meta device: what LoRA files are matched against without loading any weight.
    denoiser_linears: Callable[[Path | None], dict[str, tuple[int, int]]]
    # (root, dtype, fp8 mode, tokens, batch, adapter values, weights=TransformerFile | None) -> TrainNeeds: what a
    # LoRA training step needs on the device (None: the family does not train yet).
    train_needs: Callable[..., TrainNeeds] | None = None
    # --targets name ("attn", "attn-mlp", "all") -> the block-relative linear names it trains, for every block list
    # (a name a block does not have is skipped there: FLUX's single blocks have no to_out).
    train_targets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # (model, x0, texts, size, generator, dtype, device, refs=, ref_shapes=) -> the flow-matching loss of one
    # micro-batch (training/step.py flow_loss for Qwen-Image, training/flux_step.py flux_flow_loss for FLUX.1).
    train_loss: Callable[..., torch.Tensor] | None = None
    cfg_norm_rescale: bool = False  # true CFG keeps the conditional velocity's norm (Qwen-Image)
    # where the denoiser computes its adaLN modulation: a pipeline looks it up per run (runtime/modulation.py)
    modulation: ModulationSites | None = None
