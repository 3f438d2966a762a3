"""Qwen2.5-VL prompt encoding for a model folder: text only (text to image) or with condition images (edit)."""

from __future__ import annotations

import copy as copying
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError
from qimg.loading import components
from qimg.loading.checkpoint import GroupFill
from qimg.loading.hub import ModelRef
from qimg.nets.text_encoders import TEMPLATES, dropped_prompt_tokens, encode_qwen_prompt, encode_qwen_prompt_with_images
from qimg.pipelines.common import resize_to_area
from qimg.pipelines.family import Family
from qimg.pipelines.text_slot import TextEncoderSlot
from qimg.request import GenerateRequest
from qimg.runtime.devices import pick_device, pick_dtype
from qimg.runtime.fp8 import Predicate, apply_fp8
from qimg.runtime.host_copies import FileBlock, HostCopy
from qimg.runtime.offload import Offloaded, prepare_block
from qimg.runtime.options import RuntimeOptions
from qimg.runtime.planner import MemoryPlan
from qimg.version import __version__

# Embeddings files written before every Qwen model shared one family record name.
_LEGACY_FAMILIES = {"qwen-image-edit": "qwen-image", "qwen-image-edit-plus": "qwen-image"}


def image_fingerprint(image: Any) -> str:
    """A short hash of an image's pixels and size: saved edit embeddings must meet the images they were made with."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]


@dataclass
class QwenPromptEncoder(TextEncoderSlot):
    """The text encoder, tokenizer and (edit models) image processor of one model; each loads on first use."""

    _tokenizer: Any = None
    _image_processor: Any = None

    def _load(self) -> tuple[Any, Offloaded | None]:
        return load_text_encoder(self.ref.path / "text_encoder", self.torch_device, self.torch_dtype, self.fp8,
                                 self.plan, self.ref.spec.task, self.family.text_encoder_fp8)

    def load_tokenizers(self) -> None:
        """Read the tokenizer (and, for edit models, the image processor) now rather than at the first prompt."""
        _ = self.tokenizer
        if self.ref.spec.task == "edit":
            _ = self.image_processor

    @property
    def tokenizer(self) -> Any:
        """transformers' tokenizer for edit models (their prompts interleave image tokens), else the tokenizer.json
        through `tokenizers` alone: a text-to-image run never imports transformers."""
        folder = self.ref.path / "tokenizer"
        read = components.load_tokenizer if self.ref.spec.task == "edit" else components.load_tokenizer_file
        return self._read_once("_tokenizer", lambda: read(folder))

    @property
    def image_processor(self) -> Any:
        return self._read_once("_image_processor",
                               lambda: components.load_image_processor(self.ref.path / "processor"))

    @property
    def template_name(self) -> str:
        return self.ref.spec.prompt_template


    def encode(self, prompt: str, max_sequence_length: int = 512, images: Sequence[Any] = ()) -> PromptEmbeds:
        """Conditioning for one prompt: embeds (1, L, 3584) and no mask (a single prompt has no padding).

        Edit models see the images too, each resized to the spec's vision-encoder area at its own aspect.
        """
        template = TEMPLATES[self.template_name]
        model = self.model
        if self.residency is not None:
            self.residency.enter("text")
        if self.ref.spec.task == "edit":
            vl_images = [resize_to_area(im.convert("RGB"), self.ref.spec.vl_image_area) for im in images]
            embeds, mask = encode_qwen_prompt_with_images(
                model, self.tokenizer, self.image_processor, prompt, vl_images, template
            )
        else:
            embeds, mask = encode_qwen_prompt(model, self.tokenizer, prompt, template, max_sequence_length)
        return PromptEmbeds(embeds.to(self.torch_device), None if bool(mask.all()) else mask.to(self.torch_device))

    def encode_request(
        self, request: GenerateRequest, *, with_negative: bool = True, images: Sequence[Any] = ()
    ) -> EmbeddingsFile:
        """The positive and (if asked and given) negative embeddings of a request, with their provenance."""
        self.check_images(images)
        cond = self.encode(request.prompt, request.max_sequence_length, images)
        uncond = None
        if with_negative and request.negative is not None:
            uncond = self.encode(request.negative, request.max_sequence_length, images)
        meta = {
            "family": self.ref.spec.family,
            "template": self.template_name,
            "model": self.ref.name,
            "text_encoder": components.text_encoder_identity(self.ref.path / "text_encoder"),
            "prompt": request.prompt,
            "negative": request.negative if uncond is not None else None,
            "max_sequence_length": request.max_sequence_length,
            "images": [image_fingerprint(im) for im in images],
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "qimg_version": __version__,
        }
        dropped = self.dropped_tokens(request, with_negative=uncond is not None)
        if dropped:
            meta["dropped_tokens"] = dropped
        return EmbeddingsFile(cond, uncond, meta)

    def dropped_tokens(self, request: GenerateRequest, *, with_negative: bool) -> dict[str, int]:
        """{"prompt": n, "negative": m}: how many last tokens of each prompt the max_sequence_length cut left out
        (only the non-zero counts). Edit models read the whole prompt: their encoding has no cut."""
        if self.ref.spec.task == "edit":
            return {}
        template = TEMPLATES[self.template_name]
        texts = {"prompt": request.prompt, "negative": request.negative if with_negative else None}
        counts = {name: dropped_prompt_tokens(self.tokenizer, text, template, request.max_sequence_length)
                  for name, text in texts.items() if text is not None}
        return {name: n for name, n in counts.items() if n}

    def check_embeddings(self, data: EmbeddingsFile, images: Sequence[Any] = ()) -> None:
        """Refuse embeddings made for another model family or template, or (edit) for other input images."""
        spec = self.ref.spec
        family, template = data.meta.get("family"), data.meta.get("template")
        family = _LEGACY_FAMILIES.get(family, family)
        if family != spec.family or template != self.template_name:
            raise InputError(
                f"these prompt embeddings were made for {family} ({template}), not for {spec.family}",
                hint=f"re-create them with: qimg encode-prompt PROMPT --model {self.ref.name}",
            )
        if spec.task == "edit" and data.meta.get("images", []) != [image_fingerprint(im) for im in images]:
            raise InputError(
                "these prompt embeddings were made with other input images",
                hint="pass the same -i images to encode-prompt and edit, in the same order",
            )


def encode_prompt(ref: ModelRef, options: RuntimeOptions, request: GenerateRequest, images: Sequence[Any] = (),
                  *, family: Family) -> EmbeddingsFile:
    """Prompt embeddings for a request (and, for edit models, its input images), loading only the text encoder,
    tokenizer and image processor of the model."""
    dev = pick_device(options.device)
    encoder = QwenPromptEncoder(ref, family, dev, pick_dtype(options.dtype, dev))
    with torch.inference_mode():
        return encoder.encode_request(request, with_negative=True, images=images)


def text_encoder_layers(model: Any) -> nn.ModuleList:
    """The language model's decoder layers of a transformers Qwen2.5-VL (4.5x and 5.x module layouts)."""
    inner = model.model
    lm = getattr(inner, "language_model", inner)
    return lm.layers


def load_text_encoder(
    folder: Path, device: torch.device, dtype: torch.dtype, fp8: str | None, plan: MemoryPlan | None, task: str,
    fp8_layers: Predicate,
) -> tuple[Any, Offloaded | None]:
    """The Qwen2.5-VL text encoder placed as planned: on the device, on the CPU, or in host memory visiting
    the device for the text phase (its layers streamed when they do not fit). Unused parts are dropped: the LM
    head always, the vision tower for text-to-image. FP8 storage covers the linears `fp8_layers` selects."""
    # Normal tensors even when the first prompt arrives inside inference mode: offloading rebinds their storage.
    with torch.inference_mode(False), torch.no_grad():
        runs_on = torch.device("cpu") if plan is not None and plan.text_encoder_device == "cpu" else device
        offloaded = plan is not None and plan.mode != "none" and plan.text_encoder_device != "cpu"
        # Quantise on the GPU when there is one (seconds, against minutes on the CPU), a layer at a time.
        work = device if device.type == "cuda" else torch.device("cpu")

        def prepare(prefix: str, layer: nn.Module) -> None:
            if fp8 is not None:
                apply_fp8(layer, lambda name, lin: fp8_layers(f"layers.{prefix}{name}", lin), compute=False)
            if runs_on.type == "cpu":
                layer.to("cpu")

        copies: dict[int, HostCopy] = {}
        files: dict[int, FileBlock] = {}

        def arrived(kind: str, i: int, layer: nn.Module) -> None:  # each decoder layer as it is read
            if kind == "layers":
                copy = prepare_block(layer, work, prepare, keep=not offloaded, prefix=f"{i}.")
                if copy is not None:
                    copies[i] = copy

        def later(i: int, layer: nn.Module, fill: GroupFill) -> None:  # a layer read when the text phase comes
            def load(module: nn.Module) -> None:
                fill(module, work)
                prepare(f"{i}.", module)

            files[i] = FileBlock(load, copying.deepcopy(layer))

        # Under a plan that streams some layers, none is read now: the text phase reads them straight to the
        # device, the resident ones never taking host memory (read again if the encoder comes back).
        lazy = offloaded and plan is not None and bool(plan.streamed.get("text_encoder"))
        # The LM head (~1 GiB of logits weights) is never read; the vision tower (~1.3 GiB) only for edit models.
        # An encoder that stays on the GPU is read straight into it: through host memory, each byte would cost a
        # first touch of fresh pages (1.6 GB/s on an H200 host, against 18-21 GB/s to the GPU) and a second copy.
        read_to = work if not offloaded and runs_on == work else torch.device("cpu")
        model = components.load_text_encoder(folder, device=None, dtype=dtype, vision=task == "edit", head=False,
                                             on_layer=arrived, later=later if lazy else None, read_to=read_to)
        layers = text_encoder_layers(model)
        if not offloaded:
            return model.to(runs_on), None
        result = Offloaded(model, device, layers, block_copies=copies, files=files)
        result.stream(plan.streamed.get("text_encoder", ()) if plan is not None else ())
        return model, result
