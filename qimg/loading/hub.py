"""Where a model's files are: resolve --model (an alias, a hub repo id, or a local folder) to a folder in the
diffusers layout and the spec its own model_index.json names; resolve --lora (a local file, or OWNER/REPO/FILE of a
hub repo) to a file. Never downloads: see qimg/loading/download.py.

Names are looked up only in the standard caches, so files that another tool downloaded are reused:
  * Hugging Face: HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub; layout <cache>/models--<owner>--<name>/snapshots/<commit>/ with refs/main naming the
    commit of the main branch.
  * ModelScope: MODELSCOPE_CACHE, else ~/.cache/modelscope. modelscope >= 1.38 (1.40.2 was checked) writes
    <cache>/models/<owner>--<name>/snapshots/<revision>/ (revision "master" unless asked); older versions wrote
    <cache>/models/<owner>/<name>/ with dots in the name spelt "___", under <cache>/hub/ when MODELSCOPE_CACHE was
    unset, and before that <cache>/<owner>/<name>/. modelscope itself still reuses all of these; so does qimg.
Never a folder relative to the current directory: a cron job must find the same model wherever it starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from qimg.errors import ConfigError, InputError, ModelNotFoundError
from qimg.specs import (
    ALIASES,
    INDISTINGUISHABLE_FROM,
    MODEL_INDEX_FILE,
    SPEC_BY_PIPELINE_CLASS,
    SPECS,
    VARIANT_RULES,
    ModelSpec,
)

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
# FLUX.1 (dev and Kontext): CLIP-L in text_encoder/ + tokenizer/, T5-XXL in text_encoder_2/ + tokenizer_2/.
FLUX_COMPONENTS = {**QWEN_IMAGE_COMPONENTS, "text_encoder_2": "config.json", "tokenizer_2": "tokenizer_config.json"}
# (family, task) -> the component folders a model needs and their marker files.
COMPONENTS: dict[tuple[str, str], dict[str, str]] = {
    ("qwen-image", "t2i"): QWEN_IMAGE_COMPONENTS,
    ("qwen-image", "edit"): QWEN_IMAGE_EDIT_COMPONENTS,
    ("flux", "t2i"): FLUX_COMPONENTS,
    ("flux", "edit"): FLUX_COMPONENTS,
}


def components_of(spec: ModelSpec) -> dict[str, str]:
    """The component folders a model of this spec needs, each with the file that marks it present."""
    return COMPONENTS[(spec.family, spec.task)]


# Weight files per component, by stem: <stem>.safetensors, or <stem>.safetensors.index.json and the shards it names.
WEIGHT_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}

SOURCES = ("hf", "modelscope")  # also the order in which the caches are searched
SOURCE_NAMES = {"hf": "Hugging Face", "modelscope": "ModelScope"}
# owner/name, as both hubs spell repo ids.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# A LoRA by its hub name, OWNER/REPO/FILE.safetensors (FILE may sit in subfolders): what `qimg download` prints.
LORA_NAME = re.compile(rf"(?P<repo>{REPO_ID.pattern})/(?P<file>(?:[^/\\]+/)*[^/\\]+\.safetensors)", re.IGNORECASE)
LORA_HINT = "pass --lora PATH.safetensors[:SCALE]"


@dataclass(frozen=True)
class ModelRef:
    """A model resolved to a local folder, with the spec its own files identify."""

    path: Path
    spec: ModelSpec
    name: str  # what the user asked for, as recorded in image metadata
    # Which of the folder's files chose the spec, as a sentence for --verbose ("" when built by hand).
    chosen_by: str = ""
    # One safetensors file whose weights replace the folder's transformer weights (the configs, VAE, text
    # encoder and scheduler still come from the folder); set by qimg.with_transformer, recorded in PNGs.
    transformer: Path | None = None


@dataclass(frozen=True)
class LocalCopy:
    """A model's files found in one hub's cache; `missing` names what a download still has to fetch."""

    source: str  # "hf" or "modelscope"
    repo_id: str
    path: Path
    missing: tuple[str, ...] = ()
    size_bytes: int | None = None  # on disk; filled in by list_models only (it walks the folder)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class ModelEntry:
    """One alias of `qimg models`: its spec, its repo per hub, and the copies found in the caches."""

    name: str
    spec: ModelSpec
    copies: tuple[LocalCopy, ...]


def _env_path(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, computed as huggingface_hub does but from the environment as it is now
    (huggingface_hub reads it once, at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):  # the second: the variable's legacy name
        return _env_path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return _env_path(home) / "hub"


def modelscope_cache_dir() -> Path:
    """The ModelScope cache root (modelscope >= 1.38 default; older versions nested theirs under hub/)."""
    return _env_path(os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope")


def download_command(name: str, source: str = "hf", files: tuple[str, ...] = ()) -> str:
    """The exact command that fetches `name` (only `files` of it, when given), for error hints."""
    return (f"qimg download {shlex.quote(name)}" + "".join(f" --file {shlex.quote(f)}" for f in files)
            + (f" --source {source}" if source != "hf" else ""))


def resolve_lora(name: str | Path) -> Path:
    """--lora's file: a local path, else a name OWNER/REPO/FILE.safetensors looked up in the Hugging Face cache,
    then the ModelScope cache (where `qimg download OWNER/REPO --file FILE` puts it). Never touches the network.

    A cache hit is returned as its path in the snapshot (parents resolved, the file's own link kept): the name
    stays readable in messages and image metadata, where the blob it links to is a bare hash.
    """
    name = str(name)
    path = Path(name).expanduser()
    if path.is_file():
        # Absolute and normalised, links kept: a path this function returned for a hub cache's snapshot entry
        # must come back as itself when checked again (a batch checks the command's LoRAs, then each line's).
        return Path(os.path.abspath(path))
    if path.is_dir():
        raise InputError(f"LoRA file {path} is a folder", hint=LORA_HINT)
    m = LORA_NAME.fullmatch(name)
    if m is None or any(part in (".", "..") for part in m["file"].split("/")):
        raise InputError(f"LoRA file {path} does not exist", hint=LORA_HINT)
    repo_id, file = m["repo"], m["file"]
    for source in SOURCES:
        for folder in repo_folders(source, repo_id):
            found = folder / file
            if found.is_file():  # follows the link: a snapshot entry whose blob was deleted does not count
                return found.parent.resolve() / found.name
    raise InputError(
        f"LoRA {name} is not a local file, and {file} of {repo_id} is in neither {hf_cache_dir()} nor "
        f"{modelscope_cache_dir()}",
        hint=f"run: {download_command(repo_id, files=(file,))}",
    )


def repo_folders(source: str, repo_id: str) -> list[Path]:
    """Every copy of `repo_id` in one hub's cache, the current one first: for Hugging Face the snapshot refs/main
    names, then the other snapshots newest first; for ModelScope the folders modelscope itself reuses, then any
    other snapshot. Unlike _hf_folders, older snapshots count: a single file fetched at an older commit is still
    that file, where a model is only trusted whole."""
    if not REPO_ID.fullmatch(repo_id):
        return []
    if source == "hf":
        repo_dir = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
        folders = _newest_first(repo_dir / "snapshots")
        try:
            head = repo_dir / "snapshots" / (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
        except OSError:  # no refs/main: fetched by commit or tag only
            head = None
        if head is not None and head.is_dir():
            folders.insert(0, head)
    else:
        owner, name = repo_id.split("/", 1)
        snapshots = modelscope_cache_dir() / "models" / f"{owner}--{name}" / "snapshots"
        folders = [*_modelscope_folders(repo_id), *_newest_first(snapshots)]
    return list(dict.fromkeys(folders))


def resolve_model(model: str | Path) -> ModelRef:
    """Resolve --model to a folder and identify it from its model_index.json.

    A name in SPECS is an alias (looked up in the caches under its repo ids); otherwise an existing path is a
    local folder; otherwise owner/name is a repo id, looked up in both caches. Edit models also need processor/.
    """
    name = str(model)
    if isinstance(model, str) and model in SPECS:
        spec = SPECS[model]
        return _from_caches(name, spec.repos, expected=spec)
    path = Path(name).expanduser()
    if isinstance(model, str) and not path.exists() and REPO_ID.fullmatch(model):
        known = SPECS.get(ALIASES.get(model, ""))
        return _from_caches(name, {source: model for source in SOURCES}, expected=known)
    return _from_folder(path, name)


def _from_caches(name: str, repos: Mapping[str, str], expected: ModelSpec | None) -> ModelRef:
    """The first complete copy in the caches; else a one-line error naming the download command."""
    copies = find_local_copies(repos)
    complete = [copy for copy in copies if copy.complete]
    if not complete:
        if not copies:
            raise ModelNotFoundError(
                f"{name} is not downloaded (nothing in {hf_cache_dir()} or {modelscope_cache_dir()})",
                hint=f"run: {download_command(name)}",
            )
        copy = copies[0]
        raise ModelNotFoundError(
            f"{name} is incomplete in the {SOURCE_NAMES[copy.source]} cache ({_summary(copy.missing)} missing "
            f"under {copy.path})",
            hint=f"run: {download_command(name, copy.source)}",
        )
    ref = _from_folder(complete[0].path, name)
    if expected is not None and ref.spec.pipeline_class != expected.pipeline_class:
        raise ConfigError(
            f"{complete[0].path} holds a {ref.spec.pipeline_class} model, but {name} is a {expected.pipeline_class}",
            hint=f"the cache entry is not what the hub serves for {name}; run: {download_command(name)}",
        )
    return ref


def _summary(paths: tuple[str, ...], n: int = 2) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _from_folder(path: Path, name: str) -> ModelRef:
    """A local folder in the official diffusers layout, identified by its model_index.json."""
    if not path.exists():
        raise ModelNotFoundError(
            f"model folder {path} does not exist",
            hint="pass --model an alias (see: qimg models), a repo id, or a folder in the diffusers layout",
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a folder", hint="pass the model folder, not a file inside it")
    spec, chosen_by = identify(path)
    for component, marker in components_of(spec).items():
        if not (path / component / marker).is_file():
            why = " (edit models need the Qwen2-VL image processor)" if component == "processor" else ""
            raise ModelNotFoundError(
                f"{path} is missing its {component}/ component ({component}/{marker} not found){why}",
                hint="the download is incomplete; fetch the whole model again",
            )
    return ModelRef(path=path.resolve(), spec=spec, name=name, chosen_by=chosen_by)


def read_spec(path: Path) -> ModelSpec:
    """The spec of the model in `path`, from its own files (never from its name); see identify."""
    return identify(path)[0]


def identify(path: Path) -> tuple[ModelSpec, str]:
    """The spec of the model in `path` and a sentence naming the files that chose it: model_index.json's
    _class_name, then the first VARIANT_RULES entry whose config value matches (qimg.specs)."""
    index_path = path / MODEL_INDEX_FILE
    if not index_path.is_file():
        raise ModelNotFoundError(
            f"{path} has no {MODEL_INDEX_FILE}", hint="pass the top folder of a model in the diffusers layout"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{index_path} is not readable JSON ({e})", hint="re-download the model") from e
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in SPEC_BY_PIPELINE_CLASS:
        known = ", ".join(sorted(SPEC_BY_PIPELINE_CLASS))
        raise ConfigError(f"{path} holds a {cls} model, which qimg cannot run", hint=f"supported: {known}")
    name, chosen_by = SPEC_BY_PIPELINE_CLASS[cls], f"{MODEL_INDEX_FILE} {cls}"
    for rule in VARIANT_RULES:
        if rule.pipeline_class != cls:
            continue
        value = _config_value(path / rule.config, rule.key)
        # Same type too: JSON true must not match 1, nor 1 match true.
        if type(value) is type(rule.value) and value == rule.value:
            name, chosen_by = rule.spec, f"{chosen_by} + {rule.config} {rule.key}"
            break
    twins = INDISTINGUISHABLE_FROM.get(name, ())
    if twins:
        chosen_by += f" (a folder of {' or '.join(twins)} looks the same: no file tells them apart)"
    return SPECS[name], chosen_by


def _config_value(config: Path, key: str) -> object:
    """config[key] of a component's JSON config; None when the file or the key is absent (the component check
    reports a missing file)."""
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config} is not readable JSON ({e})", hint="re-download the model") from e
    return data.get(key) if isinstance(data, dict) else None


def missing_files(path: Path) -> tuple[str, ...]:
    """What a cached copy lacks, weights included: a download that stopped half-way leaves configs but no shards.

    Local folders are checked more leniently by _from_folder (markers only): the loader names missing weights
    there, and a cache entry, unlike a folder the user built, is only trusted when it is whole.
    """
    if not (path / MODEL_INDEX_FILE).is_file():
        return (MODEL_INDEX_FILE,)
    wanted = components_of(read_spec(path))
    missing = [f"{c}/{marker}" for c, marker in wanted.items() if not (path / c / marker).is_file()]
    for component, stem in WEIGHT_STEMS.items():
        if component in wanted:
            missing += _missing_weights(path / component, f"{component}/{stem}")
    return tuple(missing)


def _missing_weights(folder: Path, stem: str) -> list[str]:
    base = stem.rsplit("/", 1)[1]
    index = folder / f"{base}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{stem}.safetensors.index.json (unreadable)"]
        return [f"{folder.name}/{shard}" for shard in shards if not (folder / shard).is_file()]
    return [] if (folder / f"{base}.safetensors").is_file() else [f"{stem}.safetensors"]


def find_local_copies(repos: Mapping[str, str]) -> list[LocalCopy]:
    """Every copy of the given repos (source -> repo id) in the caches, in search order, complete or not."""
    copies = []
    for source in SOURCES:
        repo_id = repos.get(source)
        if not repo_id or not REPO_ID.fullmatch(repo_id):
            continue
        folders = _hf_folders(repo_id) if source == "hf" else _modelscope_folders(repo_id)
        for folder in folders:
            try:
                missing = missing_files(folder)
            except ConfigError as e:  # a foreign or broken model_index.json: report it, do not hide the copy
                missing = (f"{MODEL_INDEX_FILE} ({e.message})",)
            copies.append(LocalCopy(source=source, repo_id=repo_id, path=folder, missing=missing))
    return copies


def _hf_folders(repo_id: str) -> list[Path]:
    """Snapshots of `repo_id` in the Hugging Face cache: the one refs/main names, else every snapshot, newest first.

    The main branch is found by huggingface_hub's own cache lookup (it follows refs/main); when it names a snapshot,
    that one alone counts, complete or not, so that a half-finished update is reported instead of silently replaced
    by an older revision. A snapshot fetched by commit or tag (no refs/main) is still found.
    """
    cache = hf_cache_dir()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    if not repo_dir.is_dir():
        return []  # skip importing huggingface_hub (~0.2 s) when there is nothing to look up
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, MODEL_INDEX_FILE, cache_dir=cache)
    if isinstance(found, str):
        return [Path(found).parent]
    main = repo_dir / "refs" / "main"
    if main.is_file():
        snapshot = repo_dir / "snapshots" / main.read_text(encoding="utf-8").strip()
        return [snapshot] if snapshot.is_dir() else []
    return _newest_first(repo_dir / "snapshots")


def _modelscope_folders(repo_id: str) -> list[Path]:
    """Folders that may hold `repo_id` in the ModelScope cache, in the order modelscope itself reuses them."""
    root = modelscope_cache_dir()
    owner, name = repo_id.split("/", 1)
    safe = name.replace(".", "___")  # modelscope < 1.38 spelt dots in names so
    snapshots = root / "models" / f"{owner}--{name}" / "snapshots"
    named = [snapshots / rev for rev in ("master", "main") if (snapshots / rev).is_dir()]
    current = named or _newest_first(snapshots)
    legacy = [root / "models" / owner / safe, root / "hub" / "models" / owner / safe, root / owner / name,
              root / "hub" / owner / name]
    folders = [*current, *(p for p in legacy if p.is_dir() and any(p.iterdir()))]
    return list(dict.fromkeys(folders))  # the legacy spellings coincide for names without dots


def _newest_first(snapshots: Path) -> list[Path]:
    if not snapshots.is_dir():
        return []
    return sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)


def disk_size(path: Path) -> int:
    """Bytes on disk under `path`, following the cache's symlinks to their blobs and counting each blob once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for file in files:
            try:
                st = os.stat(os.path.join(root, file))
            except OSError:  # a dangling link: its blob was deleted
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def list_models() -> list[ModelEntry]:
    """Every alias qimg knows, with the copies of its repos found in the Hugging Face and ModelScope caches."""
    return [
        ModelEntry(name, spec, tuple(replace(c, size_bytes=disk_size(c.path)) for c in find_local_copies(spec.repos)))
        for name, spec in SPECS.items()
    ]
