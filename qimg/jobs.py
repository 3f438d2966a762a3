"""Jobs: everything one `generate` or `edit` call needs, read, checked and defaulted before any model loads.

    job = qimg.prepare_generate("qwen-image", "a red fox", seed=7)
    pipe = qimg.load(job.ref, qimg.RuntimeOptions(device="cuda"), shape=job.shape)
    image = pipe.run(job)[0]

Every check the spec and the arguments can decide happens here: the task (edit or text to image), the number
of input images, the request's bounds, saved embeddings without a negative prompt (CFG off), the img2img
strength default. `replay` turns the parameters stored in a qimg PNG back into arguments. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qimg.errors import QimgError, UsageError
from qimg.loading.hub import ModelRef, resolve_model
from qimg.png import open_image, read_params
from qimg.request import GenerateRequest, check_task, make_request, request_shape, without_negative
from qimg.runtime.planner import RequestShape

# What a replay takes from a PNG's stored parameters, when the caller did not give it.
_REPLAYED = ("seed", "steps", "cfg", "guidance", "width", "height")


@dataclass
class Job:
    """One prepared call: the model, the request, the loaded inputs and what to record about them."""

    ref: ModelRef
    method: str  # "generate" or "edit": the pipeline call that runs it
    request: GenerateRequest
    inputs: dict[str, Any] = field(default_factory=dict)  # init_image, mask, images, embeddings, keep_size
    extra: dict[str, Any] = field(default_factory=dict)  # input paths, recorded in the PNG's parameters
    notes: list[str] = field(default_factory=list)  # what was changed (snapped sizes, resampling), for people

    @property
    def shape(self) -> RequestShape:
        """The request's memory shape, for qimg.load's plan."""
        n_images = len(self.inputs.get("images", ()))
        return request_shape(self.ref.spec, self.request, n_images, "embeddings" in self.inputs)


def _ref(model: str | Path | ModelRef) -> ModelRef:
    return model if isinstance(model, ModelRef) else resolve_model(model)


def _image(value: Any, what: str, extra: dict[str, Any], key: str) -> Any:
    """A PIL image from a path (recorded in `extra`) or an image given as is."""
    if isinstance(value, (str, Path)):
        extra[key] = str(value)
        return open_image(value, what)
    return value


def _embeddings(value: Any, extra: dict[str, Any]) -> Any:
    if isinstance(value, (str, Path)):
        from qimg.embeddings import load_embeddings

        extra["prompt_embeds"] = str(value)
        return load_embeddings(value)
    return value


def _check_prompt_source(prompt: str | None, prompt_embeds: Any, negative: str | None) -> None:
    """Exactly one of a prompt and saved embeddings; the embeddings already hold their negative prompt."""
    if (prompt is None) == (prompt_embeds is None):
        raise UsageError("give either PROMPT or --prompt-embeds", hint="qimg encode-prompt makes the file")
    if prompt_embeds is not None and negative is not None:
        raise UsageError("--negative cannot change saved embeddings", hint="pass it to qimg encode-prompt instead")


def _prompts_from(embeddings: Any, prompt: str | None, negative: str | None) -> tuple[str, str | None]:
    """The prompt and negative to run: given, or (saved embeddings) the ones the embeddings were made from."""
    if embeddings is None:
        return str(prompt), negative
    return str(embeddings.meta.get("prompt", "")), embeddings.meta.get("negative")


def prepare_generate(
    model: str | Path | ModelRef,
    prompt: str | None = None,
    *,
    init_image: Any = None,
    mask: Any = None,
    prompt_embeds: Any = None,
    no_negative: bool = False,
    **options: Any,
) -> Job:
    """A text-to-image (img2img with `init_image`, inpaint with `mask`) job. Images and `prompt_embeds` are
    paths or loaded objects; options as make_request (negative, seed, steps, cfg, guidance, width, height,
    strength, max_sequence_length). no_negative: the image replayed was made without a negative prompt."""
    ref = _ref(model)
    check_task(ref.spec, ref.name, "t2i", UsageError)
    if mask is not None and init_image is None:
        raise UsageError("--strength and --mask need --init-image", hint="add --init-image PICTURE")
    if options.get("strength") is not None and init_image is None:
        raise UsageError("--strength and --mask need --init-image", hint="add --init-image PICTURE")
    inputs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    _check_prompt_source(prompt, prompt_embeds, options.get("negative"))
    embeddings = _embeddings(prompt_embeds, extra)
    prompt, negative = _prompts_from(embeddings, prompt, options.pop("negative", None))
    if embeddings is not None:
        inputs["embeddings"] = embeddings
    if init_image is not None:
        inputs["init_image"] = _image(init_image, "init image", extra, "init_image")
    if mask is not None:
        inputs["mask"] = _image(mask, "mask", extra, "mask")
    init_size = inputs["init_image"].size if init_image is not None else None
    request, notes = make_request(ref.spec, prompt, negative=negative, init_size=init_size,
                                  img2img=init_image is not None, **options)
    request = without_negative(request, embeddings, no_negative)
    if init_size is not None and (request.width, request.height) != init_size:
        notes.append(f"init image is {init_size[0]}x{init_size[1]}; generating {request.width}x{request.height}")
    return Job(ref, "generate", request, inputs, extra, notes)


def prepare_edit(
    model: str | Path | ModelRef,
    prompt: str | None = None,
    images: Sequence[Any] = (),
    *,
    keep_size: bool = False,
    prompt_embeds: Any = None,
    **options: Any,
) -> Job:
    """An edit job: `images` (paths or PIL) as the model takes them; options as make_request (no strength)."""
    ref = _ref(model)
    check_task(ref.spec, ref.name, "edit", UsageError)
    spec = ref.spec
    most = "any number of" if spec.max_images is None else f"at most {spec.max_images}"
    if len(images) < spec.min_images or (spec.max_images is not None and len(images) > spec.max_images):
        raise UsageError(f"{spec.name} takes {spec.min_images} to {most} input images, got {len(images)}",
                         hint="pass each image with -i IMAGE")
    extra: dict[str, Any] = {}
    pictures = [_image(im, "input image", {}, "") for im in images]
    if any(isinstance(im, (str, Path)) for im in images):
        extra["images"] = [str(im) for im in images]
    inputs: dict[str, Any] = {"images": pictures, "keep_size": keep_size}
    _check_prompt_source(prompt, prompt_embeds, options.get("negative"))
    embeddings = _embeddings(prompt_embeds, extra)
    prompt, negative = _prompts_from(embeddings, prompt, options.pop("negative", None))
    if embeddings is not None:
        inputs["embeddings"] = embeddings
    request, notes = make_request(spec, prompt, negative=negative, init_size=pictures[-1].size if pictures else None,
                                  **options)
    request = without_negative(request, embeddings)
    size, first = (request.width, request.height), pictures[0].size if pictures else None
    if first is not None and size != first:
        notes.append(f"generating {size[0]}x{size[1]}, resampled to the input's {first[0]}x{first[1]}" if keep_size
                     else f"output is {size[0]}x{size[1]}, input is {first[0]}x{first[1]} (--keep-size to match)")
    return Job(ref, "edit", request, inputs, extra, notes)


def replay(
    path: str | Path,
    *,
    model: str | Path | ModelRef | None = None,
    default_model: str | None = None,
    **given: Any,
) -> dict[str, Any]:
    """prepare_generate arguments that remake the qimg PNG at `path`: its stored prompt, negative, seed,
    steps, cfg, size, init image, mask and strength, and its model unless `model` is given (default_model:
    the model when the PNG names none). Arguments in `given` that are not None win over the stored ones."""
    stored = read_params(path)
    if not stored:
        raise QimgError(f"{path} carries no qimg parameters", hint="only PNGs written by qimg replay")
    args = {k: v for k, v in given.items() if v is not None}
    embeds = args.get("prompt_embeds") is not None
    if "prompt" not in args and not embeds:
        if not stored.get("prompt"):
            raise QimgError(f"{path} holds no prompt to replay", hint="it was not made by qimg generate")
        args["prompt"] = stored["prompt"]
    if "negative" not in args and not embeds:
        args["negative"] = stored.get("negative")
        args["no_negative"] = "negative" in stored and stored["negative"] is None
    for key in _REPLAYED:
        if key not in args and stored.get(key) is not None:
            args[key] = stored[key]
    if stored.get("max_sequence_length") is not None:
        args.setdefault("max_sequence_length", stored["max_sequence_length"])
    for key in ("init_image", "mask"):
        if key not in args and stored.get(key):
            args[key] = Path(stored[key])
    if "init_image" in args and "strength" not in args and stored.get("strength") is not None:
        args["strength"] = stored["strength"]
    args["model"] = model if model is not None else _stored_model(stored, path, default_model)
    return args


def _stored_model(stored: dict[str, Any], path: str | Path, default: str | None) -> ModelRef:
    """The model recorded in a PNG, saying where it came from when it is not here (a path from another machine)."""
    name = stored.get("model")
    if not name:
        if default:
            return resolve_model(default)
        raise UsageError("no model given", hint=f"{path} does not say which model made it; pass --model")
    try:
        return resolve_model(str(name))
    except QimgError as e:
        raise type(e)(f"{e.message} (the model recorded in {path})",
                      hint="pass --model to replay it with another copy of the model") from None
