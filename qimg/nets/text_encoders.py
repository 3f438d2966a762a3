"""Prompt encoding with Qwen2.5-VL (the Qwen-Image conditioning): chat template, prefix drop, masks, image tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qimg.nets.qwen_text import QwenTextEncoder


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template whose first `drop` tokens (the system block and the user tag) are cut from the output."""

    name: str
    text: str  # "{}" marks the user prompt; copied byte for byte, since the drop index counts its tokens
    drop: int
    # Edit-Plus: one prefix per condition image, put before the prompt ("{}" is the 1-based picture number).
    image_prefix: str = ""


QWEN_IMAGE_T2I = PromptTemplate(
    name="qwen-image-t2i",
    text=(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    drop=34,
)

TOKENIZER_MAX_LENGTH = 1024  # prompt tokens the pipelines let through, before the template prefix is added


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """text's token ids from a tokenizer.json read by `tokenizers` (loading.components.TokenizerFile) or from
    transformers' tokenizer (edit models'); both give the same ids."""
    if hasattr(tokenizer, "ids"):
        return tokenizer.ids(text)
    return tokenizer(text, verbose=False).input_ids


@torch.inference_mode()
def encode_qwen_prompt(
    text_encoder: Any,
    tokenizer: Any,
    prompt: str,
    template: PromptTemplate = QWEN_IMAGE_T2I,
    max_sequence_length: int = 512,
) -> tuple[Tensor, Tensor]:
    """One prompt -> (embeds (1, L, hidden) in the encoder's dtype, mask (1, L) long, all ones).

    The last hidden state (after the final norm) of the language model, with the template prefix dropped and
    the kept tokens cut to max_sequence_length. A single prompt has no padding, so the mask is all ones.
    text_encoder: qimg's QwenTextEncoder, or transformers' Qwen2.5-VL (whose `.model` skips the LM head).
    """
    device = next(text_encoder.parameters()).device
    ids = token_ids(tokenizer, template.text.format(prompt))[: TOKENIZER_MAX_LENGTH + template.drop]
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if isinstance(text_encoder, QwenTextEncoder):
        hidden = text_encoder(input_ids)
    else:
        mask = torch.ones_like(input_ids)
        hidden = text_encoder.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    embeds = hidden[:, template.drop :][:, :max_sequence_length]
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device)


def prompt_tokens(tokenizer: Any, prompt: str, template: PromptTemplate = QWEN_IMAGE_T2I) -> int:
    """How many tokens the prompt takes inside the template, before any cut (the template's own tokens aside)."""
    def count(text: str) -> int:
        return len(token_ids(tokenizer, template.text.format(text)))

    return count(prompt) - count("")


def dropped_prompt_tokens(
    tokenizer: Any, prompt: str, template: PromptTemplate = QWEN_IMAGE_T2I, max_sequence_length: int = 512
) -> int:
    """How many of the prompt's last tokens encode_qwen_prompt leaves out (it keeps max_sequence_length <= 1024)."""
    return max(0, prompt_tokens(tokenizer, prompt, template) - min(max_sequence_length, TOKENIZER_MAX_LENGTH))


# --- Edit models: the condition images go through the VL encoder too -------------------------------------------

_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
IMAGE_PAD = "<|image_pad|>"  # one placeholder per image, expanded to that image's number of vision tokens
VISION_PLACEHOLDER = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"

# Qwen-Image-Edit: exactly one image, its placeholder fixed in the template. The 64 dropped tokens are the system
# block and "<|im_start|>user\n", so every vision token is kept.
QWEN_IMAGE_EDIT = PromptTemplate(
    name="qwen-image-edit",
    text=_EDIT_SYSTEM + VISION_PLACEHOLDER + "{}<|im_end|>\n<|im_start|>assistant\n",
    drop=64,
)
# Qwen-Image-Edit-2509 / -2511: "Picture 1: ...Picture N: " placeholders concatenated before the prompt.
QWEN_IMAGE_EDIT_PLUS = PromptTemplate(
    name="qwen-image-edit-plus",
    text=_EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n",
    drop=64,
    image_prefix="Picture {}: " + VISION_PLACEHOLDER,
)
TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (QWEN_IMAGE_T2I, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS)}


def format_prompt(template: PromptTemplate, prompt: str, num_images: int = 0) -> str:
    """The template filled with the prompt, preceded by one image prefix per image where the template has one."""
    prefix = "".join(template.image_prefix.format(i + 1) for i in range(num_images)) if template.image_prefix else ""
    return template.text.format(prefix + prompt)


def vision_inputs(images: Sequence[Any], image_processor: Any) -> tuple[Tensor, Tensor]:
    """PIL images -> (pixel_values (N_patches, C*T*P*P) fp32, image_grid_thw (N_images, 3) long).

    The caller has already resized each image the way its pipeline does (LANCZOS to calculate_dimensions); the
    Qwen2-VL image processor then resizes again to multiples of patch*merge (28) within min/max_pixels, BICUBIC.
    """
    out = image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def expand_image_pads(text: str, image_grid_thw: Tensor, merge_size: int) -> str:
    """Replace the i-th <|image_pad|> with t*h*w // merge_size**2 copies for image i, as Qwen2VLProcessor does."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(image_grid_thw):
        raise ValueError(f"the text holds {len(pieces) - 1} {IMAGE_PAD} placeholders for {len(image_grid_thw)} images")
    counts = [t * h * w // merge_size**2 for t, h, w in image_grid_thw.tolist()]
    return pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:], strict=True))


def mrope_position_ids(input_ids: Tensor, image_grid_thw: Tensor | None, image_token_id: int,
                       spatial_merge_size: int) -> Tensor:
    """Qwen2-VL multimodal RoPE positions (3, 1, L) (temporal, height, width) for one unpadded sequence.

    Text tokens count up on all three axes; an image's tokens sit on its merged (h, w) grid starting at the current
    position, and the text after it resumes at start + max(h, w). Computed here rather than left to transformers:
    since 5.x the model only builds these when it is also given mm_token_type_ids, which diffusers' edit pipelines
    do not pass, and without them it silently falls back to 1-D positions the model was not trained with.
    """
    ids = input_ids.tolist()
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    chunks: list[Tensor] = []
    pos = i = 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            chunks.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        t, h, w = next(grids)  # images come in text order; each grid says how many tokens it owns
        h, w = h // spatial_merge_size, w // spatial_merge_size
        grid_t, grid_h, grid_w = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        chunks.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + pos)
        pos, i = pos + max(h, w), i + t * h * w
    return torch.cat(chunks, dim=1)[:, None].to(input_ids.device)


def prepare_vl_inputs(tokenizer: Any, image_processor: Any, text: str, images: Sequence[Any]) -> dict[str, Tensor]:
    """What Qwen2VLProcessor(text=[text], images=images) returns, without torchvision: ids, mask, pixels, grids."""
    inputs: dict[str, Tensor] = {}
    if images:
        inputs["pixel_values"], inputs["image_grid_thw"] = vision_inputs(images, image_processor)
        text = expand_image_pads(text, inputs["image_grid_thw"], image_processor.merge_size)
    elif IMAGE_PAD in text:
        raise ValueError(f"the text holds {IMAGE_PAD} placeholders but no image was given")
    # No truncation: the edit pipelines let every vision token through, however long.
    tokens = tokenizer([text], padding=True, return_tensors="pt")
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask, **inputs}


@torch.inference_mode()
def encode_qwen_prompt_with_images(
    text_encoder: Any,
    tokenizer: Any,
    image_processor: Any,
    prompt: str,
    images: Sequence[Any],
    template: PromptTemplate = QWEN_IMAGE_EDIT,
) -> tuple[Tensor, Tensor]:
    """One prompt and its condition images -> (embeds (1, L, hidden) in the encoder's dtype, mask (1, L) all ones).

    The vision tokens stay in the output: only the template's system block is dropped, and there is no
    max_sequence_length cut (the diffusers edit pipelines have none).
    """
    device = next(text_encoder.parameters()).device
    inputs = prepare_vl_inputs(tokenizer, image_processor, format_prompt(template, prompt, len(images)), images)
    input_ids = inputs["input_ids"].to(device)  # (1, L_all)
    attention_mask = inputs["attention_mask"].to(device)
    config = text_encoder.config
    image_token_id = config.image_token_id
    first_image = (input_ids[0] == image_token_id).nonzero()
    if len(first_image) and first_image[0].item() < template.drop:
        raise ValueError(f"template {template.name} would drop vision tokens (its drop index is {template.drop})")
    grid = inputs.get("image_grid_thw")
    position_ids = mrope_position_ids(input_ids[0], grid, image_token_id, config.vision_config.spatial_merge_size)
    pixel_values = inputs.get("pixel_values")
    # .model skips the LM head: the pipelines only read the final hidden state, not the logits.
    hidden = text_encoder.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=None if pixel_values is None else pixel_values.to(device),
        image_grid_thw=None if grid is None else grid.to(device),
    ).last_hidden_state
    valid = hidden[0][attention_mask[0].bool()]  # (L_valid, hidden)
    embeds = valid[template.drop :][None]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    return embeds, mask
