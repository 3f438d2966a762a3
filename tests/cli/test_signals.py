"""A real SIGINT or SIGTERM sent to a running `python -m qimg generate --prompts` on the tiny model: exit 130, no
temporary file, a manifest of whole lines that matches the images; then a rerun finishes the rest and skips the
finished images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qimg.cli.main import app

REPO = Path(__file__).resolve().parents[2]
N_PROMPTS = 5
# ~0.5 s an image on a 2-core CPU: long enough that the signal lands mid-batch, short enough for the rerun.
ARGS = ["--steps", "200", "--width", "64", "--height", "64", "--device", "cpu", "--seed", "1"]
FIRST_IMAGE_TIMEOUT = 180.0  # start-up, model and text-encoder loading, first image


def _wait_for_first_image(proc: subprocess.Popen, manifest: Path) -> None:
    deadline = time.monotonic() + FIRST_IMAGE_TIMEOUT
    while time.monotonic() < deadline:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 1:
            return
        if proc.poll() is not None:
            pytest.fail(f"the batch ended before its first image (exit {proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail("no image written in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_batch_cleanly_and_a_rerun_finishes(tiny_qwen: Path, tmp_path: Path, sig: int) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(N_PROMPTS)), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["generate", "--prompts", str(prompts), "-o", str(out), "--model", str(tiny_qwen), *ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "qimg", *argv], cwd=REPO, env=dict(os.environ),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_first_image(proc, out / "manifest.jsonl")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    done = sorted(r["path"] for r in records)
    assert done == [n for n in names if n.endswith(".png")]  # each image has its line, and only whole ones
    assert 1 <= len(done) < N_PROMPTS, "the signal arrived after the batch had finished"

    rerun = CliRunner().invoke(app, [*argv, "--json"], prog_name="qimg")
    assert rerun.exit_code == 0, rerun.output
    events = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert sorted(Path(e["path"]).name for e in events if e["event"] == "skipped") == done
    assert len([e for e in events if e["event"] == "written"]) == N_PROMPTS - len(done)
    assert len(list(out.glob("*.png"))) == N_PROMPTS
    assert len((out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()) == N_PROMPTS
