"""Model names and downloads: resolution in the Hugging Face and ModelScope caches, and `download` end to end
against a local stand-in for the hub (tests/loading/hub_server.py): resume, corruption, offline, dry run."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

import qimg
from qimg.errors import ConfigError, ModelNotFoundError
from qimg.loading.download import DownloadError, HubUnreachableError, allow_patterns
from qimg.loading.hub import hf_cache_dir, list_models, modelscope_cache_dir, resolve_model
from qimg.specs import SPECS
from tests.loading import hub_server
from tests.loading.hub_server import HubServer, Repo, refuse_other_hosts

hf_hub, tiny_qwen_repo = hub_server.hf_hub, hub_server.tiny_qwen_repo  # fixtures

SHARD = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"


def closed_port_url() -> str:
    """A localhost URL nothing listens on: connections are refused at once, as on a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def place(model: Path, dest: Path) -> Path:
    """A copy of a model folder made of symlinks (fast; resolution follows links, as in the HF cache)."""
    for src in model.rglob("*"):
        if src.is_file():
            (dest / src.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            (dest / src.relative_to(model)).symlink_to(src)
    return dest


def incomplete_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".incomplete")] if root.exists() else []


class Events:
    """A DownloadProgress that records what the library reports."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.bytes: dict[str, int] = {}
        self.finished: list[str] = []

    def start(self, path: str, size: int | None) -> None:
        self.started.append(path)

    def advance(self, path: str, nbytes: int) -> None:
        self.bytes[path] = self.bytes.get(path, 0) + nbytes

    def done(self, path: str) -> None:
        self.finished.append(path)


# --- resolution --------------------------------------------------------------------------------------------------


def test_cache_dirs_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    assert hf_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    assert hf_cache_dir() == tmp_path / "h" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert hf_cache_dir() == tmp_path / "x" / "huggingface" / "hub"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    assert modelscope_cache_dir() == tmp_path / "ms"
    monkeypatch.delenv("MODELSCOPE_CACHE")
    assert modelscope_cache_dir() == Path.home() / ".cache" / "modelscope"


def test_a_name_not_downloaded_names_the_download_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "qwen-image").mkdir(parents=True)  # a ./models folder is never looked at
    for name in ("qwen-image", "Qwen/Qwen-Image-2512", "someone/finetune"):
        with pytest.raises(ModelNotFoundError, match="is not downloaded") as info:
            resolve_model(name)
        assert info.value.hint == f"run: qimg download {name}"


@pytest.mark.parametrize(
    "layout",
    [
        "models/Qwen--Qwen-Image/snapshots/master",  # modelscope >= 1.38 (1.40.2 installed)
        "models/Qwen/Qwen-Image",  # modelscope <= 1.37 with MODELSCOPE_CACHE set
        "hub/models/Qwen/Qwen-Image",  # modelscope <= 1.37, default cache
    ],
)
def test_resolve_an_alias_from_the_modelscope_cache(tiny_qwen: Path, layout: str) -> None:
    folder = place(tiny_qwen, modelscope_cache_dir() / layout)
    ref = resolve_model("qwen-image")  # no --source: every cache is searched
    assert ref.path == folder.resolve()
    assert (ref.spec.name, ref.name) == ("qwen-image", "qwen-image")
    assert resolve_model("Qwen/Qwen-Image").name == "Qwen/Qwen-Image"  # the name stays as typed (PNG metadata)
    (entry,) = [e for e in list_models() if e.name == "qwen-image"]
    (copy,) = entry.copies
    assert (copy.source, copy.complete) == ("modelscope", True)
    assert copy.size_bytes == sum(p.stat().st_size for p in tiny_qwen.rglob("*") if p.is_file())


def test_an_incomplete_cache_copy_is_reported_with_its_source(tiny_qwen: Path) -> None:
    folder = place(tiny_qwen, modelscope_cache_dir() / "models" / "Qwen--Qwen-Image" / "snapshots" / "master")
    (folder / SHARD).unlink()  # a download that stopped before this shard
    with pytest.raises(ModelNotFoundError, match=r"incomplete in the ModelScope cache \(transformer/diffusion"):
        resolve_model("qwen-image")
    try:
        resolve_model("qwen-image")
    except ModelNotFoundError as e:
        assert e.hint == "run: qimg download qwen-image --source modelscope"


def test_the_spec_comes_from_model_index_not_the_name(tiny_qwen: Path, tiny_edit_model) -> None:
    # qwen-image-2512 shares its pipeline class with qwen-image: the spec is that class's, the name what was typed.
    place(tiny_qwen, modelscope_cache_dir() / "models" / "Qwen--Qwen-Image-2512" / "snapshots" / "master")
    ref = resolve_model("qwen-image-2512")
    assert (ref.spec.name, ref.name) == ("qwen-image", "qwen-image-2512")
    # A cache entry holding another kind of model than its alias promises is refused, not run.
    _, edit_folder = tiny_edit_model("edit")
    place(edit_folder, modelscope_cache_dir() / "models" / "Qwen--Qwen-Image" / "snapshots" / "master")
    with pytest.raises(ConfigError, match="holds a QwenImageEditPipeline model"):
        resolve_model("qwen-image")


def test_a_local_folder_still_resolves_and_wins_over_a_repo_id(tiny_qwen: Path, monkeypatch, tmp_path) -> None:
    assert resolve_model(str(tiny_qwen)).path == tiny_qwen.resolve()
    monkeypatch.chdir(tmp_path)
    place(tiny_qwen, tmp_path / "me" / "my-model")
    assert resolve_model("me/my-model").path == (tmp_path / "me" / "my-model").resolve()


# --- Hugging Face downloads against the local hub -------------------------------------------------------------


def test_download_fetches_only_what_the_engine_needs_then_resolves_by_alias(
    hf_hub: HubServer, tiny_qwen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    path = qimg.download("qwen-image", progress=events)
    repo = hf_hub.repos["Qwen/Qwen-Image"]
    assert path == hf_cache_dir() / "models--Qwen--Qwen-Image" / "snapshots" / repo.commit
    fetched = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert fetched == sorted(p.relative_to(tiny_qwen).as_posix() for p in tiny_qwen.rglob("*") if p.is_file())
    assert not [r for r in hf_hub.log if r.path.endswith((".bin", ".pt", ".md", ".png"))]
    assert all(r.method != "GET" or "/xet" not in r.path for r in hf_hub.log)  # plain HTTP, never xet
    assert events.finished == events.started and len(events.started) == len(fetched)
    assert events.bytes[VAE] == (tiny_qwen / VAE).stat().st_size
    for rel in fetched:
        assert (path / rel).read_bytes() == (tiny_qwen / rel).read_bytes()

    ref = resolve_model("qwen-image")  # found in the cache through refs/main, offline or not
    assert (ref.path, ref.name, ref.spec.name) == (path, "qwen-image", "qwen-image")

    hf_hub.log.clear()  # a second run fetches nothing
    assert qimg.download("qwen-image") == path
    assert not [r for r in hf_hub.log if r.method == "GET" and "/resolve/" in r.path]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, a complete copy is a download with nothing to do
    hf_hub.log.clear()
    plan = qimg.plan_download("qwen-image")
    assert plan.offline and plan.fetch_size == 0 and plan.commit == path.name
    assert qimg.download(plan) == path and hf_hub.log == []


def test_dry_run_lists_files_and_sizes_and_writes_nothing(hf_hub: HubServer, tiny_qwen: Path) -> None:
    plan = qimg.plan_download("qwen-image")
    sizes = {p.relative_to(tiny_qwen).as_posix(): p.stat().st_size for p in tiny_qwen.rglob("*") if p.is_file()}
    assert {f.path: f.size for f in plan.files} == sizes
    assert plan.total_size == plan.fetch_size == sum(sizes.values())
    assert plan.files[0].path == "model_index.json" and not any(f.present for f in plan.files)
    assert plan.commit == hf_hub.repos["Qwen/Qwen-Image"].commit
    assert not [r for r in hf_hub.log if "/resolve/" in r.path]
    assert not any(Path(os.environ["HF_HOME"]).rglob("*"))


def test_a_cut_connection_is_resumed_not_restarted(hf_hub: HubServer, tiny_qwen: Path) -> None:
    hf_hub.cut_once.add(SHARD)
    path = qimg.download("qwen-image")
    first, second = hf_hub.gets(SHARD)
    size = (tiny_qwen / SHARD).stat().st_size
    assert first.range is None
    start = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= size // 2  # asked only for the rest of the file
    assert (path / SHARD).read_bytes() == (tiny_qwen / SHARD).read_bytes()
    assert incomplete_files(hf_cache_dir()) == []


def test_a_failed_run_keeps_finished_files_and_a_rerun_fetches_the_rest(hf_hub: HubServer) -> None:
    hf_hub.fail[VAE] = 500
    with pytest.raises(DownloadError, match="refused"):
        qimg.download("qwen-image")
    assert incomplete_files(hf_cache_dir()) == []
    del hf_hub.fail[VAE]
    hf_hub.log.clear()
    plan = qimg.plan_download("qwen-image")
    assert [f.path for f in plan.files if not f.present] == [VAE]
    qimg.download(plan)
    assert [r.path.split("/resolve/")[1] for r in hf_hub.log if r.method == "GET" and "/resolve/" in r.path] == [
        f"{plan.commit}/{VAE}"
    ]


def test_a_corrupted_file_is_detected_and_removed(hf_hub: HubServer) -> None:
    hf_hub.corrupt.add(VAE)
    with pytest.raises(DownloadError, match=r"vae/diffusion_pytorch_model.safetensors .* is corrupt \(sha256"):
        qimg.download("qwen-image")
    snapshot = hf_cache_dir() / "models--Qwen--Qwen-Image" / "snapshots" / hf_hub.repos["Qwen/Qwen-Image"].commit
    assert not (snapshot / VAE).exists() and not (snapshot / VAE).is_symlink()
    sha = hf_hub.repos["Qwen/Qwen-Image"].sibling(VAE)["lfs"]["sha256"]
    assert not (snapshot.parents[1] / "blobs" / sha).exists()  # nor the blob named by the advertised sha256
    assert incomplete_files(hf_cache_dir()) == []
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        resolve_model("qwen-image")
    hf_hub.corrupt.clear()
    assert resolve_model(str(qimg.download("qwen-image"))).spec.name == "qwen-image"


def test_local_dir_and_token(hf_hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = qimg.download("Qwen/Qwen-Image", local_dir=tmp_path / "m")
    assert path == (tmp_path / "m").resolve()
    assert resolve_model(str(path)).spec.name == "qwen-image"
    assert not (hf_cache_dir() / "models--Qwen--Qwen-Image" / "snapshots").exists()
    assert {r.authorization for r in hf_hub.log} == {"Bearer hf_test_token"}


def test_hub_errors_are_one_line(hf_hub: HubServer, tiny_qwen_repo: Repo) -> None:
    with pytest.raises(ModelNotFoundError, match="nobody/nothing was not found on http://127.0.0.1"):
        qimg.plan_download("nobody/nothing")
    with pytest.raises(ModelNotFoundError, match="has no revision 'v9'"):
        qimg.plan_download("qwen-image", revision="v9")
    # A repo qimg cannot run: refused after its model_index.json, before any weights.
    index = json.dumps({"_class_name": "StableDiffusionXLPipeline"}).encode()
    files = {**tiny_qwen_repo.files, "model_index.json": index}
    hf_hub.repos["someone/sdxl"] = Repo("someone/sdxl", files)
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline"):
        qimg.download("someone/sdxl")
    assert not [r for r in hf_hub.log if r.method == "GET" and r.path.endswith(".safetensors")]
    hf_hub.repos["someone/half"] = Repo("someone/half", {"model_index.json": files["model_index.json"]})
    with pytest.raises(ModelNotFoundError, match="has no transformer/config.json"):
        qimg.plan_download("someone/half")


def test_offline_refuses_with_the_command_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the suite's default; spelt out here
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as info:
        qimg.download("qwen-image-edit")
    assert info.value.hint == "unset HF_HUB_OFFLINE and run: qimg download qwen-image-edit"
    assert not hf_cache_dir().exists()


def test_an_unreachable_hub_falls_back_to_a_complete_copy(hf_hub: HubServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = qimg.download("qwen-image")
    local = qimg.download("qwen-image", local_dir=tmp_path / "m")
    # A port that refuses connections, as with no network (a stopped server would still answer on kept-alive ones).
    monkeypatch.setenv("HF_ENDPOINT", url := closed_port_url())
    plan = qimg.plan_download("qwen-image")
    assert plan.unreachable is not None and plan.unreachable.startswith(f"cannot reach {url} (")
    assert not plan.offline and plan.commit == path.name and plan.fetch_size == 0 and plan.destination == path
    assert qimg.download(plan) == path
    assert qimg.download("qwen-image", local_dir=tmp_path / "m") == local
    with pytest.raises(HubUnreachableError, match="cannot reach"):  # a revision cannot be resolved offline
        qimg.download("qwen-image", revision="main")
    (path / VAE).unlink()  # an incomplete copy is no download
    with pytest.raises(HubUnreachableError, match=f"cannot reach {url}"):
        qimg.download("qwen-image")


def test_allow_patterns_follow_the_task() -> None:
    t2i, edit = allow_patterns(SPECS["qwen-image"]), allow_patterns(SPECS["qwen-image-edit-2511"])
    assert "processor/*.json" in edit and not any(p.startswith("processor/") for p in t2i)
    assert not any(p.endswith((".bin", ".pt", ".ckpt", ".pth", "*")) for p in edit)
    flux = allow_patterns(SPECS["flux-dev"])
    assert "text_encoder_2/*.safetensors" in flux and not any(p.startswith("processor/") for p in flux)
    # A repo without an alias: every component qimg knows, of either family.
    assert set(allow_patterns(None)) == set(edit) | set(flux)


# --- ModelScope wiring (its library is real; its network calls are replaced) ------------------------------------


def test_modelscope_download_wiring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_qwen: Path) -> None:
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))  # modelscope writes a session file there
    # import_module: `import modelscope.hub.snapshot_download` would give the function of that name, which
    # modelscope.hub exports over its submodule.
    ms_api = importlib.import_module("modelscope.hub.api")
    ms_snapshot = importlib.import_module("modelscope.hub.snapshot_download")

    real = ms_snapshot.snapshot_download
    files = [{"Path": p.relative_to(tiny_qwen).as_posix(), "Size": p.stat().st_size, "Type": "blob"}
             for p in tiny_qwen.rglob("*") if p.is_file()] + [{"Path": "README.md", "Size": 9, "Type": "blob"}]
    calls: list[tuple[tuple, dict]] = []

    def fake_listing(self, model_id: str, revision: str | None = None, **kw) -> list[dict]:
        calls.append(((model_id,), {"revision": revision, **kw}))
        return files

    def fake_snapshot(*args, **kwargs) -> str:
        inspect.signature(real).bind(*args, **kwargs)  # the installed modelscope accepts exactly these arguments
        calls.append((args, kwargs))
        dest = Path(kwargs["cache_dir"]) / "models" / "Qwen--Qwen-Image" / "snapshots" / "master"
        for cls in kwargs["progress_callbacks"]:
            cb = cls(VAE, 10)
            cb.update(10)
            cb.end()
        return str(place(tiny_qwen, dest))

    monkeypatch.setattr(ms_api.HubApi, "get_model_files", fake_listing)
    monkeypatch.setattr(ms_snapshot, "snapshot_download", fake_snapshot)
    monkeypatch.setattr("qimg.loading.download_modelscope._check_reachable", lambda endpoint, hint: None)  # no dial
    events = Events()
    path = qimg.download("qwen-image", source="modelscope", progress=events)
    (listing_args, listing_kw), (args, kwargs) = calls
    assert listing_args == ("Qwen/Qwen-Image",) and listing_kw["revision"] == "master"
    assert args == ("Qwen/Qwen-Image",)
    assert kwargs["allow_patterns"] == list(allow_patterns(SPECS["qwen-image"]))
    assert (kwargs["revision"], kwargs["cache_dir"]) == (None, str(modelscope_cache_dir()))
    assert (events.started, events.bytes, events.finished) == ([VAE], {VAE: 10}, [VAE])
    assert resolve_model("qwen-image").path == path.resolve()


class Records(logging.Handler):
    """The records a library's logger lets through, as its own stderr handler would print them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def modelscope_logs(monkeypatch: pytest.MonkeyPatch) -> list[logging.LogRecord]:
    handler = Records()
    for name in ("modelscope", "modelscope_hub"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [*logging.getLogger(name).handlers, handler])
    return handler.records


def unreachable_modelscope(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point modelscope's client at a closed localhost port (its config is read once per process, so the
    environment variable would come too late) and refuse any other host."""
    config = pytest.importorskip("modelscope_hub.config")
    url = closed_port_url()
    monkeypatch.setattr(config.get_default_config(), "endpoint", url)
    refuse_other_hosts(monkeypatch)
    return url


def test_an_unreachable_modelscope_is_one_fast_error_or_the_copy_on_disk(
    monkeypatch: pytest.MonkeyPatch, tiny_qwen: Path, modelscope_logs: list[logging.LogRecord]
) -> None:
    url = unreachable_modelscope(monkeypatch)
    started = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        qimg.plan_download("qwen-image", source="modelscope")
    assert time.monotonic() - started < 3  # modelscope alone retries for ~9 s
    assert info.value.message == f"cannot reach {url} (Connection refused)"
    assert [r for r in modelscope_logs if r.levelno >= logging.WARNING] == []
    folder = place(tiny_qwen, modelscope_cache_dir() / "models" / "Qwen--Qwen-Image" / "snapshots" / "master")
    plan = qimg.plan_download("qwen-image", source="modelscope")
    assert plan.unreachable == info.value.message and plan.destination == folder and plan.fetch_size == 0
    assert qimg.download(plan) == folder


def test_modelscope_listing_failures_are_short_and_its_retries_silent(
    monkeypatch: pytest.MonkeyPatch, modelscope_logs: list[logging.LogRecord]
) -> None:
    ms_api = importlib.import_module("modelscope.hub.api")
    monkeypatch.setattr("qimg.loading.download_modelscope._check_reachable", lambda endpoint, hint: None)
    raised: list[Exception] = []
    levels = [logging.getLogger(name).level for name in ("modelscope", "modelscope_hub")]

    def failing_listing(self, model_id: str, **kw) -> list[dict]:
        for attempt in (1, 2, 3):
            logging.getLogger("modelscope_hub.legacy_api").warning("listing failed, retry (%s/4)", attempt)
        raise raised[-1]

    monkeypatch.setattr(ms_api.HubApi, "get_model_files", failing_listing)
    raised.append(ConnectionError("Connection failed: " + "x" * 400))  # what modelscope_hub's NetworkError is
    with pytest.raises(HubUnreachableError, match=r"^cannot reach \S+ \(Connection failed: x+\.\.\.\)$") as info:
        qimg.plan_download("qwen-image", source="modelscope")
    assert len(info.value.message) < 200
    raised.append(ValueError("no such model " + "y" * 400))
    with pytest.raises(DownloadError, match=r"^cannot list Qwen/Qwen-Image on ModelScope") as info:
        qimg.plan_download("qwen-image", source="modelscope")
    assert not isinstance(info.value, HubUnreachableError) and len(info.value.message) < 200
    assert modelscope_logs == []
    assert [logging.getLogger(name).level for name in ("modelscope", "modelscope_hub")] == levels  # given back


# --- variants told apart by their own files ------------------------------------------------------------------------


def _local_model(root: Path, class_name: str, transformer_config: dict) -> Path:
    """A model folder with the marker files resolve_model checks, and the given transformer/config.json."""
    from qimg.loading.hub import COMPONENTS

    task = "t2i" if class_name == "QwenImagePipeline" else "edit"
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    for component, marker in COMPONENTS[("qwen-image", task)].items():
        (root / component).mkdir()
        (root / component / marker).write_text("{}")
    (root / "transformer" / "config.json").write_text(json.dumps(transformer_config))
    return root


@pytest.mark.parametrize(
    "transformer_config,spec",
    [({"_class_name": "QwenImageTransformer2DModel", "zero_cond_t": True}, "qwen-image-edit-2511"),
     ({"_class_name": "QwenImageTransformer2DModel", "zero_cond_t": False}, "qwen-image-edit-2509"),
     ({"_class_name": "QwenImageTransformer2DModel"}, "qwen-image-edit-2509")],
    ids=["2511", "2509-false", "2509-absent"],
)
def test_an_edit_plus_folder_is_told_apart_by_its_transformer_config(tmp_path: Path, transformer_config, spec) -> None:
    # The folder name says 2509 on purpose: only the files decide.
    folder = _local_model(tmp_path / "Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", transformer_config)
    ref = resolve_model(str(folder))
    assert (ref.spec.name, ref.name) == (spec, str(folder))
    assert ref.chosen_by.startswith("model_index.json QwenImageEditPlusPipeline")
    assert ("transformer/config.json zero_cond_t" in ref.chosen_by) is (spec == "qwen-image-edit-2511")


def test_qwen_image_and_2512_folders_cannot_be_told_apart(tmp_path: Path) -> None:
    """Their files differ only in the weights (diffusers_facts.md §1.1, §2.1, §3.1): a -2512 folder resolves to
    qwen-image, never by its name or a hash, and says so. Harmless while the two specs run the same way."""
    # zero_cond_t only tells Edit-Plus variants apart: here it must change nothing.
    folder = _local_model(tmp_path / "Qwen-Image-2512", "QwenImagePipeline", {"zero_cond_t": True})
    ref = resolve_model(str(folder))
    assert ref.spec.name == "qwen-image"
    assert ref.chosen_by.startswith("model_index.json QwenImagePipeline") and "qwen-image-2512" in ref.chosen_by
    from dataclasses import replace

    same = replace(SPECS["qwen-image-2512"], name="qwen-image", repos=SPECS["qwen-image"].repos)
    assert same == SPECS["qwen-image"], "-2512 now runs differently: a folder of it must not resolve to qwen-image"
