"""Prompt-file batches over several processes started by torch's launcher (torchrun), on the CPU with gloo, as
`qimg generate --gpus N` starts them on GPUs: every line once, the same files and pixels as one process, one
manifest, reruns that skip, interrupts that leave only whole files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.launch import without_option

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's process groups are POSIX here")


def _args(model: Path, prompts: Path, out: Path, steps: int = 2) -> list[str]:
    return ["generate", "--prompts", str(prompts), "-o", str(out), "--model", str(model), "--device", "cpu",
            "--steps", str(steps), "--width", "64", "--height", "64", "--seed", "11"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_write_what_one_would(tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a tiny picture number {i}\n" for i in range(5)))
    one = subprocess.run([sys.executable, "-m", "qimg", *_args(tiny_qwen, prompts, tmp_path / "one")], cwd=REPO,
                         env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the single process above: the same summation order
    code = qimg.launch_ranks(2, _args(tiny_qwen, prompts, tmp_path / "two"))
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in names:  # same seed, same pixels: a rank's own model copy computes what one process does
        assert np.array_equal(_pixels(tmp_path / "one" / name), _pixels(tmp_path / "two" / name)), name
    records = [json.loads(x) for x in (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in records) == names  # one manifest, each line once
    # The rerun is a job of two machines, as torchrun's own rendezvous flags make one (here both on this host,
    # one process each: the ranks differ, LOCAL_RANK is 0 on both); the two images removed are made again.
    for name in names[:2]:
        (tmp_path / "two" / name).unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "qimg",
                               *_args(tiny_qwen, prompts, tmp_path / "two"), "--json"],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    (out, err), (_, err1) = (node.communicate(timeout=300) for node in nodes)
    assert [node.returncode for node in nodes] == [0, 0], (err + err1)[-3000:]
    events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert sorted(e["event"] for e in events if e["event"] == "skipped") == ["skipped"] * 3  # rank 0 reports skips
    assert "done: 2 written, 3 skipped, 0 failed" in err
    for name in names:
        assert np.array_equal(_pixels(tmp_path / "one" / name), _pixels(tmp_path / "two" / name)), name


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_whole_files_and_a_rerun_finishes(tiny_qwen: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    # 96 lines: on a fast host the two ranks once wrote all of 24 before the signal reached them
    count = 96
    prompts.write_text("".join(f"picture {i}\n" for i in range(count)))
    out = tmp_path / "out"
    launcher = ("import sys, qimg; sys.exit(qimg.launch_ranks(2, sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", launcher, *_args(tiny_qwen, prompts, out, steps=6)], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("*.png")):
        time.sleep(0.05)
    assert list(out.glob("*.png")), "no image appeared"
    proc.send_signal(signal.SIGTERM)  # as a cron timeout sends it: to the launcher alone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert 0 < len(pngs) < count
    assert not list(out.glob(".*.tmp"))  # no half-written file
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["path"] for x in lines) == pngs  # a manifest line for each whole image
    for name in pngs:
        _pixels(out / name)  # every PNG decodes
    assert qimg.launch_ranks(2, _args(tiny_qwen, prompts, out, steps=6)) == 0
    assert len(list(out.glob("*.png"))) == count


def test_without_option_drops_both_spellings() -> None:
    argv = ["generate", "--prompts", "p.txt", "--gpus", "2", "-o", "out", "--gpus=all", "--seed", "1"]
    assert without_option(argv, "--gpus") == ["generate", "--prompts", "p.txt", "-o", "out", "--seed", "1"]


@pytest.mark.parametrize("argv, env, message", [
    (["--gpus", "2"], {}, "needs CUDA GPUs"),  # this machine has none
    (["--gpus", "0"], {}, "positive number or all"),
    (["--gpus", "two"], {}, "positive number or all"),
    (["--gpus", "2"], {"WORLD_SIZE": "2"}, "under torchrun leave it out"),
    (["--gpus", "2", "--device", "cpu"], {}, "contradicts it"),
])
def test_gpus_is_checked_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                env: dict[str, str], message: str) -> None:
    monkeypatch.setattr(qimg, "gpu_count", lambda: 0)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    result = CliRunner().invoke(app, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "out"),
                                      "--model", str(tmp_path), *argv])
    assert result.exit_code == 2 and message in result.output, result.output


def test_gpus_needs_a_prompt_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "a fox", "-o", str(tmp_path / "a.png"), "--gpus", "2"])
    assert result.exit_code == 2 and "--gpus needs --prompts" in result.output, result.output


def test_stdin_prompts_are_refused_under_torchrun(tmp_path: Path, tiny_qwen: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["generate", "--prompts", "-", "-o", str(tmp_path / "out"), "--model",
                                      str(tiny_qwen), "--device", "cpu"], input="a fox\n")
    assert result.exit_code == 2 and "must name a file" in result.output, result.output


def _descendants(root: int) -> list[int]:
    """The processes below `root` (Linux /proc), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def _rank_pid(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK" in b" ".join(env):
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank through /proc")
def test_a_killed_rank_loses_no_finished_image_and_a_rerun_finishes(tiny_qwen: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    total = 48  # enough that the kill lands mid-batch on a fast machine too (24 were all written once, in CI)
    prompts.write_text("".join(f"picture {i}\n" for i in range(total)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "qimg", *_args(tiny_qwen, prompts, out, steps=4)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    victim = None
    while time.monotonic() < deadline and not list(out.glob("*.png")):
        victim = victim or _rank_pid(proc.pid, 1)  # found beforehand: the kill follows the first image at once
        time.sleep(0.05)
    victim = victim or _rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)  # as the kernel's OOM killer ends a process: no handler runs
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert 0 < len(pngs) < total
    for name in pngs:
        _pixels(out / name)  # every image on disk is whole
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert {json.loads(x)["path"] for x in lines} <= set(pngs)  # no manifest line without its image
    rerun = subprocess.run([sys.executable, "-m", "qimg", *_args(tiny_qwen, prompts, out, steps=4)], cwd=REPO,
                           env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == total
    assert f"{total - len(pngs)} to generate, {len(pngs)} already done" in rerun.stderr
