"""Per-family glue: prepare -> denoise -> decode, on the shared Pipeline (base.py). Qwen-Image for now."""

from qimg.pipelines.base import Pipeline
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.pipelines.qwen import QwenImagePipeline, run_qwen, run_qwen_edit
from qimg.runtime.devices import DTYPES, pick_device, pick_dtype

__all__ = [
    "DTYPES",
    "Pipeline",
    "QwenImagePipeline",
    "QwenPromptEncoder",
    "pick_device",
    "pick_dtype",
    "run_qwen",
    "run_qwen_edit",
]
