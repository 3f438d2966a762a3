"""Qwen2.5-VL prompt encoding for a model folder: text only (text to image) or with condition images (edit)."""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError
from qimg.loading import components
from qimg.loading.hub import ModelRef
from qimg.nets.text_encoders import TEMPLATES, encode_qwen_prompt, encode_qwen_prompt_with_images
from qimg.pipelines import memory
from qimg.pipelines.common import _version, resize_to_area
from qimg.request import GenerateRequest
from qimg.runtime.offload import Residency
from qimg.runtime.planner import MemoryPlan


def image_fingerprint(image: Any) -> str:
    """A short hash of an image's pixels and size: saved edit embeddings must meet the images they were made with."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]


@dataclass
class QwenPromptEncoder:
    """The text encoder, tokenizer and (edit models) image processor of one model; each loads on first use."""

    ref: ModelRef
    torch_device: torch.device
    torch_dtype: torch.dtype
    fp8: str | None = None  # FP8 storage for the language model's linears
    plan: MemoryPlan | None = None  # where the encoder runs and whether it visits the GPU only to encode
    residency: Residency | None = None
    _model: Any = None
    _tokenizer: Any = None
    _image_processor: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model, offloaded = memory.load_text_encoder(
                self.ref.path / "text_encoder", self.torch_device, self.torch_dtype, self.fp8, self.plan,
                self.ref.spec.task,
            )
            if offloaded is not None and self.residency is not None:
                self.residency.add("text_encoder", offloaded)
        return self._model

    def release(self) -> None:
        """Free the text encoder (a later prompt loads it again)."""
        if self._model is None:
            return
        if self.residency is not None:
            self.residency.drop("text_encoder")
        self._model = None
        gc.collect()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = components.load_tokenizer(self.ref.path / "tokenizer")
        return self._tokenizer

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            self._image_processor = components.load_image_processor(self.ref.path / "processor")
        return self._image_processor

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def template_name(self) -> str:
        return self.ref.spec.prompt_template

    def check_images(self, images: Sequence[Any]) -> None:
        spec = self.ref.spec
        if spec.task != "edit":
            if images:
                raise InputError(f"{self.ref.name} is a text-to-image model; it takes no input images",
                                 hint="use an edit model (Qwen-Image-Edit, -2509, -2511) for -i IMAGE")
            return
        most = "any number of" if spec.max_images is None else f"at most {spec.max_images}"
        if len(images) < spec.min_images or (spec.max_images is not None and len(images) > spec.max_images):
            raise InputError(f"{spec.name} takes {spec.min_images} to {most} input images, got {len(images)}",
                             hint="pass each image with -i IMAGE")

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
            "qimg_version": _version(),
        }
        return EmbeddingsFile(cond, uncond, meta)

    def check_embeddings(self, data: EmbeddingsFile, images: Sequence[Any] = ()) -> None:
        """Refuse embeddings made for another model family or template, or (edit) for other input images."""
        spec = self.ref.spec
        family, template = data.meta.get("family"), data.meta.get("template")
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
