"""Per-family glue: prepare -> denoise -> decode. Qwen-Image (text to image, img2img, inpaint, edit) for now."""

from qimg.pipelines.common import DTYPES, pick_device, pick_dtype
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.pipelines.qwen import QwenImagePipeline, encode_prompt, load_pipeline, run_qwen, run_qwen_edit

__all__ = [
    "DTYPES",
    "QwenImagePipeline",
    "QwenPromptEncoder",
    "encode_prompt",
    "load_pipeline",
    "pick_device",
    "pick_dtype",
    "run_qwen",
    "run_qwen_edit",
]
