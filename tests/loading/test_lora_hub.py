"""LoRA names that resolve like model names (resolve_lora: local file, then the Hugging Face and ModelScope caches,
never the network), and `download(..., files=...)` of single .safetensors files against the local hub."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qimg
from qimg.errors import InputError, ModelNotFoundError, UsageError
from qimg.loading.download import DownloadError, HubUnreachableError, plan_download
from qimg.loading.hub import hf_cache_dir, modelscope_cache_dir, resolve_lora
from tests.loading import hub_server
from tests.loading.hub_server import EIGHT_STEPS, FOUR_STEPS, LIGHTNING, NESTED, SINGLE, HubServer
from tests.loading.test_hub import closed_port_url

lora_hub = hub_server.lora_hub  # a fixture


def hf_snapshot(repo_id: str, commit: str, files: dict[str, bytes], main: bool = False) -> Path:
    """A Hugging Face cache entry as huggingface_hub writes it: blobs, snapshot links to them, refs/main."""
    repo_dir = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / f"{commit[:8]}-{len(data)}-{abs(hash(name))}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    if main:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# --- resolve_lora ------------------------------------------------------------------------------------------------


def test_the_snapshot_refs_main_names_wins_over_a_newer_one() -> None:
    main = hf_snapshot(LIGHTNING, "a" * 40, {EIGHT_STEPS: b"main", NESTED: b"nested"}, main=True)
    newer = hf_snapshot(LIGHTNING, "b" * 40, {EIGHT_STEPS: b"newer", FOUR_STEPS: b"four"})
    age(main, 3600)
    found = resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}")
    assert found == main.resolve() / EIGHT_STEPS and found.read_bytes() == b"main"
    assert found.name == EIGHT_STEPS  # the snapshot's name, not the blob's hash
    assert resolve_lora(f"{LIGHTNING}/{NESTED}") == main.resolve() / NESTED  # FILE with subfolders
    # A file the main snapshot lacks is still found in another snapshot (fetched at an older or other revision).
    assert resolve_lora(f"{LIGHTNING}/{FOUR_STEPS}") == newer.resolve() / FOUR_STEPS


def test_without_refs_main_the_newest_snapshot_wins_and_a_dangling_link_does_not_count() -> None:
    old = hf_snapshot(LIGHTNING, "a" * 40, {EIGHT_STEPS: b"old"})
    new = hf_snapshot(LIGHTNING, "b" * 40, {EIGHT_STEPS: b"new"})
    age(old, 3600)
    assert resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}").read_bytes() == b"new"
    (new / EIGHT_STEPS).resolve().unlink()  # its blob deleted (e.g. by a cache cleaner)
    assert resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}") == old.resolve() / EIGHT_STEPS


@pytest.mark.parametrize("layout", ["models/lightx2v--Qwen-Image-Lightning/snapshots/master",  # modelscope >= 1.38
                                    "models/lightx2v/Qwen-Image-Lightning",  # older, MODELSCOPE_CACHE set
                                    "hub/models/lightx2v/Qwen-Image-Lightning"])  # older, default cache
def test_found_in_the_modelscope_cache(layout: str) -> None:
    folder = modelscope_cache_dir() / layout
    (folder / "sub" / "dir").mkdir(parents=True)
    (folder / EIGHT_STEPS).write_bytes(b"ms")
    (folder / NESTED).write_bytes(b"nested")
    assert resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}") == (folder / EIGHT_STEPS).resolve()
    assert resolve_lora(f"{LIGHTNING}/{NESTED}") == (folder / NESTED).resolve()


def test_a_local_file_wins_and_a_folder_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hf_snapshot(LIGHTNING, "a" * 40, {EIGHT_STEPS: b"cached"}, main=True)
    monkeypatch.chdir(tmp_path)
    local = tmp_path / LIGHTNING / EIGHT_STEPS
    local.parent.mkdir(parents=True)
    local.write_bytes(b"local")
    assert resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}") == local.resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_lora(f"~/{LIGHTNING}/{EIGHT_STEPS}") == local.resolve()
    local.unlink()
    local.mkdir()
    with pytest.raises(InputError, match=f"^LoRA file {LIGHTNING}/{EIGHT_STEPS} is a folder$") as info:
        resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}")
    assert info.value.hint == "pass --lora PATH.safetensors[:SCALE]"


def test_a_missing_name_says_where_it_looked_and_the_command_to_run() -> None:
    name = f"{LIGHTNING}/{NESTED}"
    with pytest.raises(InputError) as info:
        resolve_lora(name)
    message = info.value.message
    assert "\n" not in message and message.startswith(f"LoRA {name} is not a local file, and {NESTED} of {LIGHTNING}")
    assert str(hf_cache_dir()) in message and str(modelscope_cache_dir()) in message
    assert info.value.hint == f"run: qimg download {LIGHTNING} --file {NESTED}"


def test_resolving_imports_no_hub_library_nor_torch() -> None:
    """Resolution is a look at the disk: the GPU machine has no modelscope, and --help must stay fast."""
    hf_snapshot(LIGHTNING, "a" * 40, {EIGHT_STEPS: b"x"}, main=True)
    code = ("import sys; from qimg.loading.hub import resolve_lora; "
            f"resolve_lora({f'{LIGHTNING}/{EIGHT_STEPS}'!r}); "
            "print(sorted(m for m in ('torch', 'huggingface_hub', 'modelscope') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["style.safetensors", "loras/style.safetensors", "/nowhere/a/b.safetensors",
                                  "a/b/c.ckpt", "a/b/../c.safetensors", "./a/b/c.safetensors"])
def test_neither_a_file_nor_a_hub_name_keeps_the_old_message(name: str) -> None:
    with pytest.raises(InputError, match="^LoRA file .* does not exist$") as info:
        resolve_lora(name)
    assert info.value.hint == "pass --lora PATH.safetensors[:SCALE]"


# --- downloading single files ----------------------------------------------------------------------------------


def test_a_file_lands_where_resolve_lora_finds_it(lora_hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_download(LIGHTNING, files=["*8steps*"])
    assert plan.kind == "files" and [f.path for f in plan.files] == [EIGHT_STEPS]  # not the .bin twin
    assert plan.lora_names == (f"{LIGHTNING}/{EIGHT_STEPS}",) and plan.fetch_size == 3000
    path = qimg.download(plan)
    repo = lora_hub.repos[LIGHTNING]
    assert path == hf_cache_dir() / "models--lightx2v--Qwen-Image-Lightning" / "snapshots" / repo.commit
    assert (path.parents[1] / "refs" / "main").read_text() == repo.commit
    assert resolve_lora(plan.lora_names[0]) == path / EIGHT_STEPS
    assert sorted(p.name for p in path.iterdir()) == [EIGHT_STEPS]
    assert not [r for r in lora_hub.log if r.method == "GET" and r.path.endswith((".bin", ".md"))]

    lora_hub.log.clear()  # a rerun fetches nothing
    again = plan_download(LIGHTNING, files=[EIGHT_STEPS])
    assert again.fetch_size == 0 and all(f.present for f in again.files)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # no network: the file on disk is the download
    cut_off = plan_download(LIGHTNING, files=["*8steps*"])
    assert cut_off.unreachable is not None and cut_off.fetch_size == 0 and qimg.download(cut_off) == path
    with pytest.raises(HubUnreachableError, match="cannot reach"):
        plan_download(LIGHTNING, files=[FOUR_STEPS])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, a file on disk is a download with nothing to do
    offline = plan_download(LIGHTNING, files=[EIGHT_STEPS])
    assert offline.offline and offline.fetch_size == 0 and qimg.download(offline) == path
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as info:
        plan_download(LIGHTNING, files=[FOUR_STEPS])
    assert info.value.hint == f"unset HF_HUB_OFFLINE and run: qimg download {LIGHTNING} --file {FOUR_STEPS}"


def test_several_patterns_and_a_file_in_a_subfolder(lora_hub: HubServer, tmp_path: Path) -> None:
    path = qimg.download(LIGHTNING, files=[NESTED, FOUR_STEPS])
    assert (path / NESTED).read_bytes() == b"s" * 500 and (path / FOUR_STEPS).is_file()
    assert resolve_lora(f"{LIGHTNING}/{NESTED}") == path / NESTED
    local = qimg.plan_download(LIGHTNING, files=[NESTED], local_dir=tmp_path / "loras")
    assert qimg.download(local) == (tmp_path / "loras").resolve()
    assert local.lora_names == (str((tmp_path / "loras" / NESTED).resolve()),)
    assert resolve_lora(local.lora_names[0]).read_bytes() == b"s" * 500


def test_which_files_a_repo_gives_without_and_with_file(lora_hub: HubServer) -> None:
    plan = plan_download(SINGLE)  # not a model, one .safetensors file: that one
    assert plan.kind == "files" and plan.lora_names == (f"{SINGLE}/one.safetensors",)
    with pytest.raises(UsageError, match=r"holds 3 \.safetensors files \(Qwen-Image-Lightning-4steps") as info:
        plan_download(LIGHTNING)  # several: no surprise gigabytes, the user picks
    assert info.value.hint.startswith(f"e.g. qimg download {LIGHTNING} --file {FOUR_STEPS}; list them with")
    with pytest.raises(ModelNotFoundError, match=r"has no \.safetensors file matching '\*16steps\*'$") as info:
        plan_download(LIGHTNING, files=["*8steps*", "*16steps*"])
    assert info.value.hint.startswith(f"its .safetensors files: {FOUR_STEPS}, {EIGHT_STEPS}, {NESTED}")
    with pytest.raises(ModelNotFoundError, match="matching 'README.md'"):
        plan_download(SINGLE, files=["README.md"])
    with pytest.raises(UsageError, match="names a file, not a repo") as info:
        plan_download(f"{SINGLE}/one.safetensors")
    assert info.value.hint == f"run: qimg download {SINGLE} --file one.safetensors"
    assert not [r for r in lora_hub.log if "/resolve/" in r.path]  # nothing fetched by any of these


def test_a_corrupt_file_is_removed_and_the_hint_names_the_file(lora_hub: HubServer) -> None:
    lora_hub.corrupt.add(EIGHT_STEPS)
    with pytest.raises(DownloadError, match=f"{EIGHT_STEPS} from {LIGHTNING} is corrupt") as info:
        qimg.download(LIGHTNING, files=[EIGHT_STEPS])
    assert f"qimg download {LIGHTNING} --file {EIGHT_STEPS}" in info.value.hint
    with pytest.raises(InputError, match="is not a local file"):
        resolve_lora(f"{LIGHTNING}/{EIGHT_STEPS}")


def test_modelscope_file_download_wiring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    ms_api = importlib.import_module("modelscope.hub.api")
    ms_snapshot = importlib.import_module("modelscope.hub.snapshot_download")
    real = ms_snapshot.snapshot_download
    listing = [{"Path": EIGHT_STEPS, "Size": 3, "Type": "blob"}, {"Path": FOUR_STEPS, "Size": 3, "Type": "blob"},
               {"Path": "sub", "Type": "tree"}, {"Path": NESTED, "Size": 3, "Type": "blob"}]
    seen: dict = {}

    def fake_snapshot(*args, **kwargs) -> str:
        inspect.signature(real).bind(*args, **kwargs)  # the installed modelscope accepts exactly these arguments
        seen.update(kwargs, args=args)
        dest = Path(kwargs["cache_dir"]) / "models" / "lightx2v--Qwen-Image-Lightning" / "snapshots" / "master"
        (dest / "sub" / "dir").mkdir(parents=True)
        for name in (EIGHT_STEPS, NESTED):
            (dest / name).write_bytes(b"abc")
        return str(dest)

    monkeypatch.setattr(ms_api.HubApi, "get_model_files", lambda self, model_id, **kw: listing)
    monkeypatch.setattr(ms_snapshot, "snapshot_download", fake_snapshot)
    monkeypatch.setattr("qimg.loading.download_modelscope._check_reachable", lambda endpoint, hint: None)
    plan = plan_download(LIGHTNING, source="modelscope", files=["*8steps*", NESTED])
    path = qimg.download(plan)
    assert seen["args"] == (LIGHTNING,) and seen["allow_patterns"] == [EIGHT_STEPS, NESTED]  # exact names only
    assert seen["cache_dir"] == str(modelscope_cache_dir())
    assert resolve_lora(plan.lora_names[0]) == (path / EIGHT_STEPS).resolve()
    assert resolve_lora(f"{LIGHTNING}/{NESTED}") == (path / NESTED).resolve()
