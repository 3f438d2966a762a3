"""A training run's settings: defaults with their anchors (lora_and_training.md section 6), checks, and a TOML
file holding the same keys (`qimg train-lora --config FILE.toml`; flags given on the command line win).
Torch-free."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qimg.errors import UsageError

FORMATS = ("diffusers", "comfy", "kohya")
# Which linears of each block train, by --targets (musubi's 12 per block for attn-mlp; "all" adds modulation as
# ai-toolkit and DiffSynth do).
TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"),
}
TARGETS["attn-mlp"] = TARGETS["attn"] + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                                         "txt_mlp.net.2")
TARGETS["all"] = TARGETS["attn-mlp"] + ("img_mod.1", "txt_mod.1")
# FLUX.1 (diffusers' module names, both block lists): attn is the attention projections of both streams and the
# single blocks' q, k, v; attn-mlp adds every MLP linear, the single blocks' proj_mlp and proj_out (musubi's
# lora_flux.py: every block linear but the modulation); all adds the modulation (sd-scripts' choice).
FLUX_TARGETS: dict[str, tuple[str, ...]] = {"attn": TARGETS["attn"]}
FLUX_TARGETS["attn-mlp"] = FLUX_TARGETS["attn"] + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                   "ff_context.net.2", "proj_mlp", "proj_out")
FLUX_TARGETS["all"] = FLUX_TARGETS["attn-mlp"] + ("norm1.linear", "norm1_context.linear", "norm.linear")
# Settings a resumed run must share with the run it continues (others, like the learning rate, may change).
FIXED_ON_RESUME = ("model", "data", "rank", "alpha", "targets", "seed", "resolution", "batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """A training run's settings (the reference defaults: lora_and_training.md section 6)."""

    model: str
    data: str
    steps: int = 2000
    rank: int = 16
    alpha: float = 16.0
    lr: float = 1e-4
    warmup: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    resolution: int = 1024  # buckets hold at most resolution^2 pixels
    batch_size: int = 1
    grad_accum: int = 1
    targets: str = "attn-mlp"
    save_every: int = 250
    keep: int = 4
    format: str = "diffusers"
    # Recompute blocks' activations in backward: ~1 more forward per checkpointed block, most of its activation
    # memory saved (bench/train.py measures both). None: the memory plan checkpoints as few blocks as fit the
    # budget; True: every block; False: none. Results do not change, so a resumed run may switch it.
    checkpointing: bool | None = None
    # Sample images every N steps (0: never) from a prompt file (.txt/.jsonl/.csv, as `generate --prompts` reads
    # it; a line's seed, else seed + its index), through generate's code path with the adapter live.
    sample_every: int = 0
    sample_prompts: str | None = None
    # Under torchrun: shard the frozen denoiser over the ranks with FSDP2 (each holds 1/N of it) instead of a copy
    # per rank. None: shard when the memory plan would otherwise stream blocks from host memory; True: always
    # (refused outside torchrun); False: never. Results do not change, so a resumed run may switch it.
    shard_base: bool | None = None

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "rank": self.rank, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "save_every": self.save_every, "keep": self.keep}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number of at least 1 (got {value})")
        for name, value in (("alpha", self.alpha), ("lr", self.lr), ("grad_clip", self.grad_clip)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {value})")
        if not 256 <= self.resolution <= 4096 or self.resolution % 16:
            raise UsageError(f"--resolution must be a multiple of 16 between 256 and 4096 (got {self.resolution})")
        if self.targets not in TARGETS:
            raise UsageError(f"unknown --targets {self.targets!r}", hint=f"use one of {', '.join(TARGETS)}")
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format {self.format!r}", hint=f"use one of {', '.join(FORMATS)}")
        if self.warmup < 0 or self.seed < 0 or self.sample_every < 0:
            raise UsageError("--warmup, --seed and --sample-every must be 0 or more")
        if self.sample_every and not self.sample_prompts:
            raise UsageError("--sample-every needs --sample-prompts FILE", hint="a prompt file, one prompt a line")

    @property
    def max_pixels(self) -> int:
        return self.resolution * self.resolution

    def lr_at(self, step: int) -> float:
        """Constant after a linear warmup over the first `warmup` steps (step counts from 0)."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr


# Keys a config file may hold besides TrainConfig's fields: where the run goes and how the model runs.
FILE_ONLY_KEYS = ("output", "device", "dtype", "fp8", "vram_budget", "compile")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, keys as TrainConfig spells them ("batch_size" or "batch-size"); an unknown
    key, a file that is not TOML, or a missing file is one line naming the file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML ({e})") from None
    known = {f.name for f in fields(TrainConfig)} | set(FILE_ONLY_KEYS)
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"config file {path}: unknown key {key!r}",
                             hint="keys: " + ", ".join(sorted(known)))
        out[name] = value
    return out
