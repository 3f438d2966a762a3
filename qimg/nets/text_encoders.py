"""Prompt encoding with Qwen2.5-VL (the Qwen-Image conditioning): chat template, prefix drop, masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template whose first `drop` tokens (the system block and the user tag) are cut from the output."""

    name: str
    text: str  # "{}" marks the user prompt; copied byte for byte, since the drop index counts its tokens
    drop: int


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
    """
    device = next(text_encoder.parameters()).device
    tokens = tokenizer(
        [template.text.format(prompt)],
        max_length=TOKENIZER_MAX_LENGTH + template.drop,
        padding=True,
        truncation=True,
        return_tensors="pt",
    ).to(device)
    # .model skips the LM head: the pipelines only read the final hidden state, not the logits.
    hidden = text_encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    valid = hidden[0][tokens.attention_mask[0].bool()]  # (L_valid, hidden)
    embeds = valid[template.drop :][:max_sequence_length][None]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    return embeds, mask
