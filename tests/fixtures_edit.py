"""Tiny random Qwen-Image-Edit / -Edit-2509 / -Edit-2511 models in the official layout, and diffusers oracles on them.

diffusers' edit pipelines need a `processor` (transformers' Qwen2VLProcessor), which transformers 5.x cannot
construct without torchvision (its video-processor check fails). The oracle here is the real Qwen2VLProcessor class
with only that constructor check skipped for video_processor=None, so its __call__ (placeholder expansion,
tokenization, mm_token_type_ids) is transformers' own code, on the PIL image processor.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fixtures import QWEN_SCHEDULER, TINY_MMDIT, TINY_VAE, randomize_, tiny_text_encoder

# processor/preprocessor_config.json of the released edit models. Source: Qwen/Qwen2.5-VL-7B-Instruct's
# preprocessor_config.json (the text encoder these models ship), whose values several independent public copies
# agree on; that the Edit repos' processor/ holds the same file is not checked against the Hub (diffusers_facts §9).
# min_pixels = 56*56 (4 merged tokens), max_pixels = 28*28*16384 (16384 tokens), so ~1 MP edit images pass unshrunk.
QWEN_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# variant -> (model_index.json _class_name, transformer zero_cond_t)
EDIT_VARIANTS = {
    "edit": ("QwenImageEditPipeline", False),
    "edit-2509": ("QwenImageEditPlusPipeline", False),
    "edit-2511": ("QwenImageEditPlusPipeline", True),
}


def reference_processor(tokenizer: Any, preprocessor: dict[str, Any] = QWEN_VL_PREPROCESSOR) -> Any:
    """transformers' Qwen2VLProcessor on the PIL image processor, built without torchvision (test-only)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class _Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
        # The only change: accept video_processor=None, whose class lookup needs torchvision in transformers 5.x.
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    settings = {k: v for k, v in preprocessor.items() if k not in ("image_processor_type", "processor_class")}
    return _Qwen2VLProcessorNoVideo(
        image_processor=Qwen2VLImageProcessorPil(**settings), tokenizer=tokenizer, video_processor=None
    )


@contextlib.contextmanager
def forwarding_mm_token_type_ids(text_encoder: Any) -> Iterator[None]:
    """Make diffusers' text-encoder call pass mm_token_type_ids, as diffusers PR #14189 (issue #14194) proposes.

    diffusers 0.42.1 passes only ids, mask, pixels and grids; transformers 5.x then builds 1-D positions instead of
    the multimodal RoPE positions (3-D for vision tokens) that transformers 4.x built from input_ids alone. Inside
    this block the oracle gets the 4.x behaviour the models were released with, which is what qimg computes.
    """
    inner = text_encoder.forward
    image_token_id = text_encoder.config.image_token_id

    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("image_grid_thw") is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == image_token_id).long()
        return inner(*args, **kwargs)

    text_encoder.forward = forward
    try:
        yield
    finally:
        del text_encoder.forward  # back to the class's forward


def write_processor_folder(folder: Path, tokenizer_dir: Path,
                           preprocessor: dict[str, Any] = QWEN_VL_PREPROCESSOR) -> None:
    """processor/ as the Hub has it: the preprocessor settings plus a copy of the tokenizer files."""
    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def write_tiny_qwen_image_edit(root: Path, tokenizer_dir: Path, variant: str = "edit", *, seed: int = 0) -> Any:
    """A tiny random edit model in the official layout; returns diffusers' pipeline on the same weights.

    The returned pipeline's processor is reference_processor(); wrap calls in forwarding_mm_token_type_ids() for
    the released (multimodal RoPE) behaviour of the text encoder.
    """
    import diffusers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer

    class_name, zero_cond_t = EDIT_VARIANTS[variant]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    transformer = QwenImageTransformer2DModel(**TINY_MMDIT, zero_cond_t=zero_cond_t).eval()
    pipe = getattr(diffusers, class_name)(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=randomize_(AutoencoderKLQwenImage(**TINY_VAE).eval(), seed + 1),
        text_encoder=tiny_text_encoder(seed + 2),
        tokenizer=tokenizer,
        processor=None,  # saved by hand below: the stand-in would be recorded under its own class name
        transformer=randomize_(transformer, seed + 3),
    )
    pipe.save_pretrained(root)
    root = Path(root)
    write_processor_folder(root / "processor", Path(tokenizer_dir))
    index = json.loads((root / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    pipe.register_modules(processor=reference_processor(tokenizer))
    return pipe
