"""FLUX.1 prompt encoding for a model folder: CLIP-L's pooled vector and T5-XXL's token embeddings, computed as
diffusers' FluxPipeline.encode_prompt does (the same prompt to both encoders, padded to fixed lengths, no mask)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError
from qimg.loading import components, flux_text
from qimg.loading.hub import ModelRef
from qimg.pipelines.family import Family
from qimg.pipelines.text_slot import TextEncoderSlot
from qimg.request import GenerateRequest
from qimg.runtime.devices import pick_device, pick_dtype
from qimg.runtime.fp8 import FP8Linear, Predicate, apply_fp8
from qimg.runtime.host_copies import HostCopy
from qimg.runtime.offload import Offloaded, prepare_block
from qimg.runtime.options import RuntimeOptions
from qimg.runtime.planner import MemoryPlan
from qimg.version import __version__

# What saved FLUX embeddings record as their "template": FLUX.1 wraps the prompt in none; this names the recipe
# (CLIP-L pooled + T5 tokens), so that Qwen embeddings are refused by name, and a future recipe can be too.
TEMPLATE = "flux-clip-t5"
T5_MAX_LENGTH = 512  # diffusers refuses a longer max_sequence_length for FLUX.1

# T5 linears that FP8 storage covers: each block's attention projections and gated FFN (wi for ungated T5), by
# their T5EncoderModel names (= the text_encoder_2 checkpoint keys without ".weight"). The token embedding, the
# relative position bias and the norms stay in the compute dtype; CLIP (~250 MB) stays whole.
_T5_FP8 = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.[qkvo]|DenseReluDense\.(?:wi_0|wi_1|wi|wo))")


def t5_fp8_layers(name: str, module: nn.Linear | None) -> bool:
    """The FLUX family's text-encoder FP8 predicate: T5 attention q/k/v/o and FFN wi_0/wi_1/wo of every block."""
    return _T5_FP8.fullmatch(name) is not None


def clip_pooled(model: Any, tokenizer: Any, prompt: str) -> Tensor:
    """CLIP-L's pooled output (1, 768): the prompt padded with <|endoftext|> to the tokenizer's 77 and cut there."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # (1, 77)
    return model(ids.to(model.device), output_hidden_states=False).pooler_output


def t5_embeds(model: Any, tokenizer: Any, prompt: str, max_sequence_length: int) -> Tensor:
    """T5's last hidden states (1, L, 4096) over the prompt padded with <pad> to L and cut there (its "</s>"
    kept); the padding is attended to, as in diffusers (no attention mask)."""
    ids = tokenizer([prompt], padding="max_length", max_length=max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids  # (1, L)
    return model(ids.to(model.device), output_hidden_states=False)[0]


def count_dropped(tokenizer: Any, prompt: str, keep: int) -> int:
    """How many of a prompt's last tokens a cut to `keep` tokens (its special tokens included) leaves out."""
    return max(0, len(tokenizer(prompt, truncation=False, verbose=False).input_ids) - keep)


def check_length(max_sequence_length: int) -> None:
    """Refuse more T5 tokens than FLUX.1 was trained with, as diffusers does (the request allows Qwen's 1024)."""
    if max_sequence_length > T5_MAX_LENGTH:
        raise InputError(f"FLUX.1 reads at most {T5_MAX_LENGTH} prompt tokens (max_sequence_length "
                         f"{max_sequence_length} asked)", hint=f"pass --max-sequence-length {T5_MAX_LENGTH} or less")


@dataclass
class FluxPromptEncoder(TextEncoderSlot):
    """CLIP-L and T5 with their tokenizers, of one FLUX.1 model; the encoders load together on first use."""

    _tokenizer: Any = None
    _tokenizer_2: Any = None

    def _load(self) -> tuple[nn.ModuleDict, Offloaded | None]:
        """{"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}, placed as the plan says."""
        return load_text_encoders(self.ref, self.torch_device, self.torch_dtype, self.fp8, self.plan,
                                  self.family.text_encoder_fp8)

    def load_tokenizers(self) -> None:
        """Read both tokenizers now rather than at the first prompt."""
        _ = self.tokenizer, self.tokenizer_2

    @property
    def tokenizer(self) -> Any:
        return self._read_once("_tokenizer", lambda: flux_text.load_clip_tokenizer(self.ref.path / "tokenizer"))

    @property
    def tokenizer_2(self) -> Any:
        return self._read_once("_tokenizer_2", lambda: flux_text.load_t5_tokenizer(self.ref.path / "tokenizer_2"))

    @property
    def template_name(self) -> str:
        return TEMPLATE


    def encode(self, prompt: str, max_sequence_length: int = T5_MAX_LENGTH, images: Sequence[Any] = ()
               ) -> PromptEmbeds:
        """Conditioning for one prompt: T5 embeds (1, L, 4096) with L = max_sequence_length, no mask, and CLIP's
        pooled vector (1, 768), both in the pipeline dtype. The text encoders never see images."""
        check_length(max_sequence_length)
        models = self.model
        if self.residency is not None:
            self.residency.enter("text")
        pooled = clip_pooled(models["text_encoder"], self.tokenizer, prompt)
        embeds = t5_embeds(models["text_encoder_2"], self.tokenizer_2, prompt, max_sequence_length)
        dev, dt = self.torch_device, self.torch_dtype
        return PromptEmbeds(embeds.to(dev, dt), None, pooled.to(dev, dt))

    def encode_request(
        self, request: GenerateRequest, *, with_negative: bool = True, images: Sequence[Any] = ()
    ) -> EmbeddingsFile:
        """The positive and (if asked and given) negative embeddings of a request, with their provenance."""
        self.check_images(images)
        check_length(request.max_sequence_length)
        cond = self.encode(request.prompt, request.max_sequence_length)
        uncond = None
        if with_negative and request.negative is not None:
            uncond = self.encode(request.negative, request.max_sequence_length)
        root = self.ref.path
        meta = {
            "family": self.ref.spec.family,
            "template": self.template_name,
            "model": self.ref.name,
            "text_encoder": components.text_encoder_identity(root / "text_encoder"),
            "text_encoder_2": components.text_encoder_identity(root / "text_encoder_2"),
            "prompt": request.prompt,
            "negative": request.negative if uncond is not None else None,
            "max_sequence_length": request.max_sequence_length,
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "qimg_version": __version__,
        }
        dropped = self.dropped_tokens(request, with_negative=uncond is not None)
        if dropped:
            meta["dropped_tokens"] = dropped
        return EmbeddingsFile(cond, uncond, meta)

    def dropped_tokens(self, request: GenerateRequest, *, with_negative: bool) -> dict[str, int]:
        """{"prompt": n, "negative": m}: how many last tokens of each prompt T5's max_sequence_length cut left out,
        and under "prompt_clip" / "negative_clip" how many CLIP's 77-token cut did (diffusers only logs that one);
        only the non-zero counts."""
        texts = {"prompt": request.prompt, "negative": request.negative if with_negative else None}
        counts = {}
        for name, text in texts.items():
            if text is not None:
                counts[name] = count_dropped(self.tokenizer_2, text, request.max_sequence_length)
                counts[f"{name}_clip"] = count_dropped(self.tokenizer, text, self.tokenizer.model_max_length)
        return {name: n for name, n in counts.items() if n}

    def check_embeddings(self, data: EmbeddingsFile, images: Sequence[Any] = ()) -> None:
        """Refuse embeddings made for another model family or recipe, or without CLIP's pooled vector."""
        family, template = data.meta.get("family"), data.meta.get("template")
        if family != self.ref.spec.family or template != self.template_name:
            raise InputError(
                f"these prompt embeddings were made for {family} ({template}), not for {self.ref.spec.family}",
                hint=f"re-create them with: qimg encode-prompt PROMPT --model {self.ref.name}",
            )
        parts = [data.cond] + ([] if data.uncond is None else [data.uncond])
        if any(p.pooled is None for p in parts):
            raise InputError("these prompt embeddings lack the pooled CLIP vector FLUX.1 is conditioned on",
                             hint=f"re-create them with: qimg encode-prompt PROMPT --model {self.ref.name}")


def encode_prompt(ref: ModelRef, options: RuntimeOptions, request: GenerateRequest, images: Sequence[Any] = (),
                  *, family: Family) -> EmbeddingsFile:
    """Prompt embeddings for a request, loading only the two text encoders and their tokenizers."""
    dev = pick_device(options.device)
    encoder = FluxPromptEncoder(ref, family, dev, pick_dtype(options.dtype, dev))
    with torch.inference_mode():
        return encoder.encode_request(request, with_negative=True, images=images)


def load_text_encoders(
    ref: ModelRef, device: torch.device, dtype: torch.dtype, fp8: str | None, plan: MemoryPlan | None,
    fp8_layers: Predicate,
) -> tuple[nn.ModuleDict, Offloaded | None]:
    """CLIP-L and T5 as one component, placed as planned: on the device, on the CPU, or in host memory visiting
    the device for the text phase, T5's blocks (the plan's text_encoder block indices) streamed when they do not
    all fit. FP8 storage covers the T5 linears `fp8_layers` selects."""
    # Normal tensors even when the first prompt arrives inside inference mode: offloading rebinds their storage.
    with torch.inference_mode(False), torch.no_grad():
        clip = flux_text.load_clip_text_model(ref.path / "text_encoder", device="cpu", dtype=dtype)
        runs_on = torch.device("cpu") if plan is not None and plan.text_encoder_device == "cpu" else device
        offloaded = plan is not None and plan.mode != "none" and plan.text_encoder_device != "cpu"
        work = device if device.type == "cuda" else torch.device("cpu")  # quantise on the GPU when there is one

        def prepare(prefix: str, block: nn.Module) -> None:
            if fp8 is not None:
                apply_fp8(block, lambda name, lin: fp8_layers(f"{prefix}{name}", lin), compute=False)
                _keep_ffn_input_dtype(block)
            if runs_on.type == "cpu":
                block.to("cpu")

        copies: dict[int, HostCopy] = {}

        def arrived(i: int, block: nn.Module) -> None:  # each T5 block as it is read: host memory holds one
            copy = prepare_block(block, work, prepare, keep=not offloaded, prefix=f"encoder.block.{i}.")
            if copy is not None:
                copies[i] = copy

        t5 = flux_text.load_t5_encoder(ref.path / "text_encoder_2", device=None, dtype=dtype, on_block=arrived)
        models = nn.ModuleDict({"text_encoder": clip, "text_encoder_2": t5})
        blocks = t5.encoder.block
        if not offloaded:
            return models.to(runs_on), None
        result = Offloaded(models, device, blocks, block_copies=copies)
        result.stream(plan.streamed.get("text_encoder", ()) if plan is not None else ())
        return models, result


def _keep_ffn_input_dtype(block: nn.Module) -> None:
    """transformers' T5 FFN casts its input to `wo.weight.dtype` (float32 when it keeps wo in float32 for float16
    runs); an FP8 wo has no weight, so it gets an empty stand-in of the dtype its linear had."""
    for ffn in block.modules():
        wo = getattr(ffn, "wo", None)
        if isinstance(wo, FP8Linear):
            object.__setattr__(wo, "weight", torch.empty(0, dtype=wo.out_dtype))
