"""Jobs: everything one `generate` or `edit` call needs, read, checked and defaulted before any model loads.

    job = qimg.prepare_generate("qwen-image", "a red fox", seed=7)
    pipe = qimg.load(job.ref, qimg.RuntimeOptions(device="cuda"), shape=job.shape)
    image = pipe.run(job)[0]

Every check the spec and the arguments can decide happens here: the task (edit or text to image), the number
of input images, the request's bounds, saved embeddings without a negative prompt (CFG off), the img2img
strength default. `replay` turns the parameters stored in a qimg PNG back into arguments. Torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qimg.errors import InputError, QimgError, UsageError
from qimg.loading.hub import ModelRef, resolve_lora, resolve_model
from qimg.png import read_image, read_params
from qimg.presets import suggest_preset
from qimg.request import GenerateRequest, check_images, check_task, make_request, request_shape, without_negative
from qimg.runtime.planner import RequestShape
from qimg.specs import ALIASES, SPECS, ModelSpec

# What a replay takes from a PNG's stored parameters, when the caller did not give it.
_REPLAYED = ("seed", "steps", "cfg", "guidance", "width", "height", "preset")


@dataclass
class Job:
    """One prepared call: the model, the request, the loaded inputs and what to record about them."""

    ref: ModelRef
    method: str  # "generate" or "edit": the pipeline call that runs it
    request: GenerateRequest
    inputs: dict[str, Any] = field(default_factory=dict)  # init_image, mask, images, embeddings, keep_size
    extra: dict[str, Any] = field(default_factory=dict)  # input paths, recorded in the PNG's parameters
    notes: list[str] = field(default_factory=list)  # what was changed (snapped sizes, resampling), for people
    # (absolute path, scale) to attach, in order; None leaves whatever the pipeline has attached as it is
    loras: list[tuple[str, float]] | None = None

    @property
    def shape(self) -> RequestShape:
        """The request's memory shape, for qimg.load's plan."""
        n_images = len(self.inputs.get("images", ()))
        return request_shape(self.ref.spec, self.request, n_images, "embeddings" in self.inputs)


def parse_lora(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (path, scale); the scale defaults to 1.0 and may be zero or negative. A colon that
    is not followed by a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise UsageError(f"--lora {text}: the scale must be a finite number",
                             hint="e.g. --lora style.safetensors:0.8")
        return path, scale
    return text, 1.0


def lora_list(value: Any) -> list[tuple[str, float]]:
    """A prompt-file line's "lora": "PATH[:SCALE]", or a list of such strings or {"path": ..., "scale": ...}
    objects ([] means none for this line). Raises ValueError with a message for people."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError('lora must be "PATH[:SCALE]" or a list of them (or of {"path": ..., "scale": ...})')
    out = []
    for item in items:
        if isinstance(item, str) and item.strip():
            out.append(parse_lora(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "scale"}:
            scale = item.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"lora scale must be a finite number (got {json.dumps(scale)})")
            out.append((item["path"], float(scale)))
        else:
            raise ValueError(f'each lora is "PATH[:SCALE]" or {{"path": ..., "scale": ...}} (got {json.dumps(item)})')
    return out


def check_loras(loras: Sequence[tuple[str | Path, float]]) -> list[tuple[str, float]]:
    """Each LoRA is a local file or an OWNER/REPO/FILE.safetensors name in the hub caches (one line naming it
    otherwise: loading.hub.resolve_lora); paths made absolute, so a job is the same from any folder. The file
    itself is read when it is attached."""
    return [(str(resolve_lora(path)), float(scale)) for path, scale in loras]


def preset_hints(loras: Sequence[tuple[str | Path, float]] | None, request: GenerateRequest) -> list[str]:
    """A line for each LoRA whose file name says it is a distilled (Lightning) LoRA, when no preset is in use:
    run at the model's own 50 steps, CFG 4 and schedule it gives noise, and nothing else would say why."""
    if request.preset is not None:
        return []
    out = []
    for path, _ in loras or ():
        wanted = suggest_preset(path)
        if wanted is not None:
            out.append(f"{Path(path).name} looks like a Lightning LoRA; add --preset {wanted} for the steps, CFG "
                       "and schedule it was distilled for")
    return out


def _ref(model: str | Path | ModelRef, check: Callable[[ModelSpec, str], None]) -> ModelRef:
    """The model resolved and checked. A known name or repo id is checked against its spec first, so a request
    the model cannot serve says so even when the model is not downloaded."""
    if not isinstance(model, ModelRef):
        name = str(model)
        known = SPECS.get(name) or SPECS.get(ALIASES.get(name, ""))
        if known is not None and not Path(name).expanduser().exists():
            check(known, name)
        model = resolve_model(model)
    check(model.spec, model.name)
    return model


def _for_generate(spec: ModelSpec, name: str) -> None:
    check_task(spec, name, "t2i", UsageError)


def _for_edit(n_images: int) -> Callable[[ModelSpec, str], None]:
    def check(spec: ModelSpec, name: str) -> None:
        check_task(spec, name, "edit", UsageError)
        check_images(spec, name, n_images, UsageError)

    return check


def check_prompt_inputs(model: str | Path | ModelRef, n_images: int) -> ModelRef:
    """The model for encode-prompt, with its input images counted (none for text-to-image) before loading."""
    return _ref(model, lambda spec, name: check_images(spec, name, n_images, UsageError))


def _image(value: Any, what: str, extra: dict[str, Any], key: str, notes: list[str], mode: str = "RGB") -> Any:
    """A PIL image from a path, read as the pipelines take it (read_image: upright, `mode`, 8-bit; what it changed
    goes to `notes`) and recorded in `extra`; or an image given as is."""
    if isinstance(value, (str, Path)):
        image, changed = read_image(value, what, mode=mode)
        notes += changed
        _record(value, extra, key)
        return image
    return value


def _record(path: str | Path, extra: dict[str, Any], key: str) -> None:
    """An input file in the PNG's parameters: its absolute path (so --from works from any folder) and, under
    KEY_sha256, a short hash of its bytes (so a replay can tell the file changed since)."""
    p = Path(path).expanduser().resolve()
    extra[key] = str(p)
    extra[f"{key}_sha256"] = _file_sha256(p)


def _file_sha256(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256: enough to tell a changed input."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _embeddings(value: Any, extra: dict[str, Any]) -> Any:
    if isinstance(value, (str, Path)):
        from qimg.embeddings import load_embeddings

        embeddings = load_embeddings(value)
        _record(value, extra, "prompt_embeds")
        return embeddings
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
    loras: Sequence[tuple[str | Path, float]] | None = None,
    **options: Any,
) -> Job:
    """A text-to-image (img2img with `init_image`, inpaint with `mask`) job. Images and `prompt_embeds` are
    paths or loaded objects; options as make_request (negative, seed, steps, cfg, guidance, width, height,
    strength, max_sequence_length). no_negative: the image replayed was made without a negative prompt.
    loras: (path, scale) pairs the pipeline must have attached for this job (None: leave them as they are)."""
    ref = _ref(model, _for_generate)
    if mask is not None and init_image is None:
        raise UsageError("--strength and --mask need --init-image", hint="add --init-image PICTURE")
    if options.get("strength") is not None and init_image is None:
        raise UsageError("--strength and --mask need --init-image", hint="add --init-image PICTURE")
    inputs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    read: list[str] = list(options.pop("notes", None) or ())  # replay's notes (an input changed since), then ours
    _check_prompt_source(prompt, prompt_embeds, options.get("negative"))
    embeddings = _embeddings(prompt_embeds, extra)
    prompt, negative = _prompts_from(embeddings, prompt, options.pop("negative", None))
    if embeddings is not None:
        inputs["embeddings"] = embeddings
    if init_image is not None:
        inputs["init_image"] = _image(init_image, "init image", extra, "init_image", read)
    if mask is not None:
        inputs["mask"] = _image(mask, "mask", extra, "mask", read, mode="L")  # white = repaint
    init_size = inputs["init_image"].size if init_image is not None else None
    request, notes = make_request(ref.spec, prompt, negative=negative, init_size=init_size,
                                  img2img=init_image is not None, **options)
    request = without_negative(request, embeddings, no_negative)
    notes[:0] = read
    if init_size is not None and (request.width, request.height) != init_size:
        notes.append(f"init image is {init_size[0]}x{init_size[1]}; generating {request.width}x{request.height}")
    notes += preset_hints(loras, request)
    return Job(ref, "generate", request, inputs, extra, notes, None if loras is None else check_loras(loras))


def prepare_edit(
    model: str | Path | ModelRef,
    prompt: str | None = None,
    images: Sequence[Any] = (),
    *,
    keep_size: bool = False,
    prompt_embeds: Any = None,
    loras: Sequence[tuple[str | Path, float]] | None = None,
    **options: Any,
) -> Job:
    """An edit job: `images` (paths or PIL) as the model takes them; options as make_request (no strength);
    loras: (path, scale) pairs the pipeline must have attached for this job (None: leave them as they are)."""
    ref = _ref(model, _for_edit(len(images)))
    spec = ref.spec
    extra: dict[str, Any] = {}
    read: list[str] = []
    files: list[dict[str, Any]] = [{} for _ in images]  # each path's absolute path and hash; {} for a PIL image
    pictures = [_image(im, "input image", file, "image", read) for im, file in zip(images, files, strict=True)]
    if any(files):
        extra["images"] = [file.get("image") for file in files]
        extra["images_sha256"] = [file.get("image_sha256") for file in files]
    inputs: dict[str, Any] = {"images": pictures, "keep_size": keep_size}
    _check_prompt_source(prompt, prompt_embeds, options.get("negative"))
    embeddings = _embeddings(prompt_embeds, extra)
    prompt, negative = _prompts_from(embeddings, prompt, options.pop("negative", None))
    if embeddings is not None:
        inputs["embeddings"] = embeddings
    request, notes = make_request(spec, prompt, negative=negative, init_size=pictures[-1].size if pictures else None,
                                  **options)
    request = without_negative(request, embeddings)
    notes[:0] = read
    size, first = (request.width, request.height), pictures[0].size if pictures else None
    if first is not None and size != first:
        notes.append(f"generating {size[0]}x{size[1]}, resampled to the input's {first[0]}x{first[1]}" if keep_size
                     else f"output is {size[0]}x{size[1]}, input is {first[0]}x{first[1]} (--keep-size to match)")
    notes += preset_hints(loras, request)
    return Job(ref, "edit", request, inputs, extra, notes, None if loras is None else check_loras(loras))


def replay(
    path: str | Path,
    *,
    model: str | Path | ModelRef | None = None,
    default_model: str | None = None,
    **given: Any,
) -> dict[str, Any]:
    """prepare_generate arguments that remake the qimg PNG at `path`: its stored prompt, negative, seed,
    steps, cfg, size, init image, mask and strength, and its model unless `model` is given (default_model:
    the model when the PNG names none). Arguments in `given` that are not None win over the stored ones. A stored
    input file that is gone is an InputError; one changed since (its hash differs) adds a line to "notes", which
    prepare_generate puts in the job's notes."""
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
    if "loras" not in args and isinstance(stored.get("loras"), list):
        args["loras"] = [(str(item["path"]), float(item.get("scale", 1.0))) for item in stored["loras"]
                         if isinstance(item, dict) and item.get("path")]
    for key in _REPLAYED:
        if key not in args and stored.get(key) is not None:
            args[key] = stored[key]
    if stored.get("max_sequence_length") is not None:
        args.setdefault("max_sequence_length", stored["max_sequence_length"])
    notes: list[str] = []
    for key, what in (("init_image", "init image"), ("mask", "mask")):
        if key not in args and stored.get(key):
            args[key] = _stored_input(stored, key, what, path, notes)
    if notes:
        args["notes"] = notes
    if "init_image" in args and "strength" not in args and stored.get("strength") is not None:
        args["strength"] = stored["strength"]
    args["model"] = model if model is not None else _stored_model(stored, path, default_model)
    if model is None and stored.get("transformer"):
        args["model"] = _stored_transformer(args["model"], stored, path, args.setdefault("notes", []))
    return args


def _stored_transformer(model: Any, stored: dict[str, Any], png: str | Path, notes: list[str]) -> ModelRef:
    """The recorded model with the single-file transformer the image was made with: gone is an error, changed
    since (another hash) a note."""
    from qimg.loading.single_file import file_sha256, with_transformer

    p = Path(stored["transformer"]).expanduser()
    if not p.is_file():
        raise InputError(f"the transformer file {png} was made with is not at {p}",
                         hint="pass --model (and --transformer FILE) to replay it with other weights")
    recorded = stored.get("transformer_sha256")
    if recorded and file_sha256(p) != recorded:
        notes.append(f"transformer file {p} changed since {png} was made (its content hash differs)")
    return with_transformer(model, p)


def _stored_input(stored: dict[str, Any], key: str, what: str, png: str | Path, notes: list[str]) -> Path:
    """The input file a PNG names under `key`: absolute since qimg records it so; an older PNG's relative path is
    looked for from here, then beside the PNG. Missing is an error; changed since (another hash) is a note."""
    p = Path(stored[key]).expanduser()
    if not p.is_absolute() and not p.exists() and (Path(png).expanduser().parent / p).exists():
        p = Path(png).expanduser().parent / p
    if not p.is_file():
        flag = "--init-image" if key == "init_image" else "--mask"
        raise InputError(f"the {what} {png} was made from is not at {p}", hint=f"pass {flag} to give it")
    recorded = stored.get(f"{key}_sha256")
    if recorded and _file_sha256(p) != recorded:
        notes.append(f"{what} {p} changed since {png} was made (its content hash differs); using it as it is now")
    return p


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
