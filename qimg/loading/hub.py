"""Where a model's files are: resolve a --model argument to a local folder in the diffusers layout and its spec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qimg.errors import ConfigError, ModelNotFoundError
from qimg.specs import SPEC_BY_PIPELINE_CLASS, SPECS, ModelSpec

# Every component folder a text-to-image Qwen-Image model needs, and the file that marks each as present.
QWEN_IMAGE_COMPONENTS = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
# Edit models add the Qwen2-VL processor (image preprocessing settings and a copy of the tokenizer).
QWEN_IMAGE_EDIT_COMPONENTS = {**QWEN_IMAGE_COMPONENTS, "processor": "preprocessor_config.json"}
COMPONENTS_BY_TASK: dict[str, dict[str, str]] = {"t2i": QWEN_IMAGE_COMPONENTS, "edit": QWEN_IMAGE_EDIT_COMPONENTS}


@dataclass(frozen=True)
class ModelRef:
    """A model resolved to a local folder, with the spec its own files identify."""

    path: Path
    spec: ModelSpec
    name: str  # what the user asked for, as recorded in image metadata


def resolve_model(model: str | Path) -> ModelRef:
    """Resolve --model (a local folder in the official diffusers layout) and identify it from model_index.json.

    The component folders required depend on the spec's task: edit models also need processor/.
    """
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model folder {path} does not exist",
            hint="pass --model a local folder in the diffusers layout (with model_index.json)",
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a folder", hint="pass the model folder, not a file inside it")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelNotFoundError(
            f"{path} has no model_index.json", hint="pass the top folder of a model in the diffusers layout"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{index_path} is not readable JSON ({e})", hint="re-download the model") from e
    cls = index.get("_class_name")
    if cls not in SPEC_BY_PIPELINE_CLASS:
        known = ", ".join(sorted(SPEC_BY_PIPELINE_CLASS))
        raise ConfigError(f"{path} holds a {cls} model, which this command cannot run", hint=f"supported: {known}")
    # The spec comes from the pipeline class alone: a folder's name says nothing qimg relies on.
    spec = SPECS[SPEC_BY_PIPELINE_CLASS[cls]]
    for component, marker in COMPONENTS_BY_TASK[spec.task].items():
        if not (path / component / marker).is_file():
            why = " (edit models need the Qwen2-VL image processor)" if component == "processor" else ""
            raise ModelNotFoundError(
                f"{path} is missing its {component}/ component ({component}/{marker} not found){why}",
                hint="the download is incomplete; fetch the whole model again",
            )
    return ModelRef(path=path.resolve(), spec=spec, name=str(model))
