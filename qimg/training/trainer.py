"""LoRA training for a family's denoiser (Qwen-Image and its Edit models, FLUX.1-dev and Kontext): flow matching on
cached latents and prompt embeddings. The family record gives the loss (`Family.train_loss`) and the linears each
--targets name trains (`Family.train_targets`).

One step: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0 (MSE), with t = sigmoid(N(0, 1))
shifted for the image's token count (Qwen-Image: musubi-tuner's `qwen_shift`, mu linear from 256 tokens -> 0.5 to
8192 -> 0.9, t' = e^mu t / (1 + (e^mu - 1) t); FLUX.1: `flux_shift`, 256 -> 0.5 to 4096 -> 1.15, guidance 1.0).
The adapters are runtime/lora.py's side branches with fp32 master weights (trainable_lora); the base model stays
frozen in its load dtype. AdamW, constant learning rate after a linear warmup, gradients clipped to a norm.

Edit models (Qwen-Image-Edit, -2509, -2511) train on (controls, target) pairs the way they edit: each control's
latents (VAE posterior mode at the spec's VAE area, as run_qwen_edit makes them) follow the noisy target tokens
with their own RoPE frame, the prompt embeddings are the VL prompt that saw the controls, the model gets
n_target (so -2511's zero_cond_t gives the control tokens the t = 0 modulation), and the loss and the timestep
shift cover the target tokens only. FLUX.1-Kontext trains the same way: its control at the training resolution
nearest its aspect, after the targets at RoPE frame 1 (training/flux_step.py).

Everything random in a step comes from a generator seeded by (seed, step, micro-batch), and the data order is a
pure function of (seed, epoch) (data.epoch_batches), so a run resumed from its saved state (adapter, optimizer,
step, epoch, position) goes on exactly as it would have: on the CPU, bit for bit (tests/training).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qimg.embeddings import EmbeddingsFile, PromptEmbeds, load_embeddings, save_embeddings
from qimg.errors import InputError, UsageError
from qimg.loading.hub import ModelRef
from qimg.pipelines.common import image_to_tensor
from qimg.pipelines.loras import model_linears
from qimg.png import read_image, save_png, write_atomic
from qimg.prompt_files import read_prompts
from qimg.request import GenerateRequest, make_request
from qimg.runtime.lora import attach_lora, trainable_lora
from qimg.runtime.planner import TrainPlan
from qimg.safety import deferred_signals
from qimg.sampling import pack
from qimg.training.config import FIXED_ON_RESUME, TARGETS, TrainConfig
from qimg.training.data import TrainItem, bucket_for, cache_key, epoch_batches, find_items
from qimg.training.images import DatasetError, load_image
from qimg.training.lora_file import check_saved, save_lora
from qimg.training.memory import place_for_training
from qimg.training.sharding import release_offload, shard_denoiser
from qimg.training.step import Grid, control_size, init_adapters, step_generator

ADAPTER = "train"



@dataclass
class Progress:
    """Where a run stands: the next step to take and where the data order is."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # index into epoch_batches(..., epoch)


class Trainer:
    """One training run in RUN_DIR: prepare (data, cache, adapters), then run steps, saving state as it goes."""

    def __init__(self, config: TrainConfig, run_dir: Path, pipe: Any, *,
                 on_event: Callable[[dict[str, Any]], None] | None = None, world: Any = None,
                 sharded: bool = False) -> None:
        self.config, self.run_dir, self.pipe = config, run_dir, pipe
        self.on_event = on_event or (lambda event: None)
        # runtime/distributed.World of a torchrun job (None: alone). Each step's micro-batches are shared out over
        # the ranks and their gradients summed, so a step is the one process's step with the same global batch;
        # rank 0 alone fills the cache, samples and writes.
        self.world = world
        self.leader = world is None or world.leader
        # The frozen model sharded over the ranks (training/sharding.py): every rank then runs every forward,
        # the sample images' too.
        self.sharded = sharded and world is not None
        self.items: list[TrainItem] = []
        self.sizes: list[tuple[int, int]] = []
        self.ref_shapes: list[tuple[Grid, ...]] = []  # each item's control token grids (edit models; else ())
        self.cache: list[Path] = []
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.progress = Progress()
        self._order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches), built when first needed
        # (request, embeddings encoded once before the encoder goes, the input images of edit models)
        self.samples: list[tuple[GenerateRequest, EmbeddingsFile, list[Any]]] = []

    # -- preparing ------------------------------------------------------------------------------------------

    def prepare(self, items: Sequence[TrainItem], *, resume: dict[str, Any] | None = None,
                plan: TrainPlan | None = None) -> None:
        """Cache latents and prompt embeddings (only those not cached yet), free the text encoder, attach the
        adapters (from the saved state when resuming), place the frozen model as the training memory plan says
        (None: resident, every block checkpointed or none as config.checkpointing says) and make the
        optimizer."""
        self.items = list(items)
        self.sizes = [bucket_for(i.width, i.height, max_pixels=self.config.max_pixels) for i in self.items]
        if self.leader:
            self._fill_cache()
        if self.world is not None:
            _barrier()  # the others find the leader's cache complete: they only read it
            if not self.leader:
                self._fill_cache()
        self.samples = self._sample_requests() if self.leader or self.sharded else []
        self.pipe.prompts.release()
        model = self.pipe.transformer
        if self.sharded:
            release_offload(self.pipe)  # sharding places the weights, block by block
        if plan is None:
            n = len(self.pipe.family.denoiser_blocks.modules(model))
            plan = TrainPlan(None, (), tuple(range(n)) if self.config.checkpointing else (), 0, n)
        # Placed before the adapters exist: packing blocks into host memory must not take the trainable
        # adapters along (the optimizer updates those in place, on the device).
        place_for_training(self.pipe, plan)
        family = self.pipe.family
        linears = model_linears(model)
        # Block by block in the target table's order (so a run's adapters, and their seeded initialisation, do
        # not depend on module registration order); a name a block list lacks is skipped there.
        names = [name for blocks in family.denoiser_blocks.names for i in range(len(model.get_submodule(blocks)))
                 for t in family.train_targets[self.config.targets] if (name := f"{blocks}.{i}.{t}") in linears]
        init = init_adapters(model, names, self.config.rank, self.config.seed)
        scale = self.config.alpha / self.config.rank
        with torch.inference_mode(False):
            attach_lora(model, ADAPTER, {n: (d, u, scale) for n, (d, u) in init.items()}, dtype=torch.float32)
        self.params = trainable_lora(model, ADAPTER)
        for param in self.params.values():  # the adapters of streamed (or sharded) blocks were made in host memory
            param.data = param.data.to(self.pipe.torch_device)
        if self.sharded:
            shard_denoiser(model, family.denoiser_blocks.modules(model), self.params.values(), self.pipe.torch_device)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=self.config.lr)
        if resume is not None:
            self._restore(resume)

    def _fill_cache(self) -> None:
        folder = self.run_dir / "cache"
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = f"{self.pipe.ref.name}:{self.pipe.ref.spec.name}:{self.pipe.dtype}"
        self.cache = [folder / f"{cache_key(item, size, fingerprint)}.safetensors"
                      for item, size in zip(self.items, self.sizes, strict=True)]
        spec = self.pipe.ref.spec
        # From the headers alone: batching needs every item's grids, cached or not.
        self.ref_shapes = []
        for item in self.items:
            sizes = [control_size(spec, c) for c in item.controls]
            self.ref_shapes.append(tuple((1, ch // 16, cw // 16) for cw, ch in sizes))
        todo = [i for i, path in enumerate(self.cache) if not path.is_file()]
        for n, i in enumerate(todo, 1):
            item, (w, h), path = self.items[i], self.sizes[i], self.cache[i]
            with torch.inference_mode():
                mean, _ = self.pipe.encode_image(load_image(item.image, (w, h))[None])
                # The posterior's mode: deterministic, and what inference feeds for an edit's input images too.
                tensors = {"latents": pack(self.pipe.vae.normalize(mean)).float().cpu()}
                # The controls as `qimg edit` reads them from files (upright RGB) and feeds them to the VAE
                # (resized to the grid, not cropped) and to the prompt encoder (which sizes them itself).
                images = [read_image(control, "control image")[0] for control in item.controls]
                for k, (image, (_, gh, gw)) in enumerate(zip(images, self.ref_shapes[i], strict=True)):
                    mean, _ = self.pipe.encode_image(image_to_tensor(image, 16 * gw, 16 * gh))
                    tensors[f"control_{k}"] = pack(self.pipe.vae.normalize(mean)).float().cpu()
                if item.controls:
                    tensors["control_grids"] = torch.tensor(self.ref_shapes[i], dtype=torch.int64)  # (n, 3)
                request, _ = make_request(spec, item.caption or " ", width=w, height=h, seed=0)
                text = self.pipe.encode_prompts(request, with_negative=False, images=images)
            embeds_path = path.with_suffix(".text.safetensors")
            save_embeddings(embeds_path, text, overwrite=True)  # encode-prompt's format
            write_atomic(path, lambda f, x=tensors: f.write(_tensor_bytes(x)), overwrite=True)
            self.on_event({"event": "cached", "done": n, "total": len(todo), "image": str(item.image)})

    def _sample_requests(self) -> list[tuple[GenerateRequest, EmbeddingsFile, list[Any]]]:
        """The sample prompts as requests (the line's seed, else seed + its index) with their embeddings, encoded
        now so that sampling never loads the text encoder again.

        Edit models: every sample prompt edits the control images of the dataset's first item (in dataset order),
        read as `qimg edit` reads them, and its embeddings are encoded with those images; without a width and
        height the output takes the last control's aspect, as an edit does."""
        if not self.config.sample_every or not self.config.sample_prompts:
            return []
        images = [read_image(c, "control image")[0] for c in self.items[0].controls] if self.items else []
        init_size = images[-1].size if images else None
        out = []
        for index, line in enumerate(read_prompts(self.config.sample_prompts)):
            options = {k: getattr(line, k) for k in ("negative", "steps", "cfg", "width", "height", "preset")
                       if getattr(line, k) is not None}
            request, _ = make_request(self.pipe.ref.spec, line.prompt, init_size=init_size,
                                      seed=self.config.seed + index if line.seed is None else line.seed, **options)
            with torch.inference_mode():
                embeddings = self.pipe.encode_prompts(request, with_negative=request.cfg_enabled, images=images)
            out.append((request, embeddings, images))
        return out

    def sample(self) -> list[Path]:
        """One image per sample prompt with the adapter as trained so far, as RUN_DIR/samples/stepN-I.png: made by
        generate, or for edit models by edit on the first item's controls (see _sample_requests). A sharded model
        needs every rank in each forward: they all make the images, and rank 0 writes them."""
        folder = self.run_dir / "samples"
        if self.leader:
            folder.mkdir(exist_ok=True)
        written = []
        for index, (request, embeddings, images) in enumerate(self.samples):
            with torch.inference_mode():
                if images:
                    image = self.pipe.edit(request=request, images=images, embeddings=embeddings)[0]
                else:
                    image = self.pipe.generate(request=request, embeddings=embeddings)[0]
            path = folder / f"step{self.progress.step:06d}-{index:02d}.png"
            if not self.leader:
                continue
            written.append(save_png(image, path, overwrite=True))
            self.on_event({"event": "sample", "step": self.progress.step, "path": str(path)})
        return written

    def _batch(self, indices: Sequence[int]
               ) -> tuple[torch.Tensor, list[PromptEmbeds], torch.Tensor | None, tuple[Grid, ...]]:
        """Target latents, prompts, and (edit models) the control latents of each item end to end with their
        token grids."""
        files = [load_file(str(self.cache[i])) for i in indices]
        latents = torch.cat([f["latents"] for f in files])
        texts = [load_embeddings(self.cache[i].with_suffix(".text.safetensors")).cond for i in indices]
        if "control_grids" not in files[0]:
            return latents, texts, None, ()
        grids = [tuple((int(a), int(b), int(c)) for a, b, c in f["control_grids"].tolist()) for f in files]
        if any(g != grids[0] for g in grids):  # epoch_batches groups by the grids; a mix cannot stack
            raise RuntimeError(f"a training batch mixes control sizes: {grids}")
        refs = torch.cat([torch.cat([f[f"control_{k}"] for k in range(len(grids[0]))], dim=1) for f in files])
        return latents, texts, refs, grids[0]

    # -- training ---------------------------------------------------------------------------------------------

    def loss(self, indices: Sequence[int], step: int, micro: int) -> torch.Tensor:
        """The flow-matching loss of one micro-batch (one bucket: every image the same size)."""
        # A signal raised inside safetensors' reader comes out as a ValueError ("could not determine the shape of
        # object type UntypedStorage"), not as the interrupt: reading the cached batch defers it to after the read.
        with deferred_signals():
            x0, texts, refs, ref_shapes = self._batch(indices)
        gen = step_generator(self.config.seed, step, micro)
        return self.pipe.family.train_loss(self.pipe.transformer, x0, texts, self.sizes[indices[0]], gen,
                                           self.pipe.torch_dtype, self.pipe.torch_device, refs=refs,
                                           ref_shapes=ref_shapes)

    def run(self) -> Path:
        """Train to config.steps, saving state every save_every steps and at the end; returns
        RUN_DIR/lora.safetensors. Ctrl-C or SIGTERM (under qimg.catch_signals) saves what is done and re-raises,
        so the run resumes from there."""
        cfg = self.config
        log = _Log(self.run_dir / "log.csv", self.progress.step)
        saved = self.progress.step
        try:
            while self.progress.step < cfg.steps:
                self._step(log)
                if self.progress.step % cfg.save_every == 0 or self.progress.step == cfg.steps:
                    if self.leader:
                        with deferred_signals():
                            self.save()
                    saved = self.progress.step
                if cfg.sample_every and self.progress.step % cfg.sample_every == 0 and (self.leader or self.sharded):
                    self.sample()
                    self.pipe.phase("denoise")  # decoding may have put the denoiser back in host memory
        except KeyboardInterrupt:
            if self.progress.step > saved and self.leader:
                with deferred_signals():
                    self.save()
            raise
        return self.run_dir / "lora.safetensors"

    def _next_batch(self, epoch: int, position: int) -> tuple[list[int], int, int]:
        """The batch at (epoch, position) and where the one after it is; the order of an epoch is rebuilt from
        (seed, epoch) alone, which is what makes resuming exact."""
        while True:
            if self._order[0] != epoch:
                # Edit items also group by their controls' grids, so a batch's control latents stack.
                groups = self.ref_shapes if self.pipe.ref.spec.task == "edit" else None
                self._order = (epoch, epoch_batches(self.items, self.sizes, batch_size=self.config.batch_size,
                                                    seed=self.config.seed, epoch=epoch, groups=groups))
            if position < len(self._order[1]):
                return self._order[1][position], epoch, position + 1
            epoch, position = epoch + 1, 0

    def _step(self, log: _Log) -> None:
        """One optimizer step over grad_accum micro-batches."""
        cfg, optimizer = self.config, self.optimizer
        assert optimizer is not None, "prepare() first"
        started = time.perf_counter()
        step, epoch, position = self.progress.step, self.progress.epoch, self.progress.position
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        total = 0.0
        batches = []  # every micro-batch of the step, in the one order whatever the rank count
        for _ in range(cfg.grad_accum):
            indices, epoch, position = self._next_batch(epoch, position)
            batches.append(indices)
        size, rank = (1, 0) if self.world is None else (self.world.size, self.world.rank)
        with torch.enable_grad():
            for micro in range(rank, cfg.grad_accum, size):  # this rank's share; each keeps its own noise draw
                loss = self.loss(batches[micro], step, micro)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
        if self.world is not None:
            total = _sum_over_ranks(list(self.params.values()), total)
        with deferred_signals():  # the update and the progress that records it go together
            norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.progress = Progress(step + 1, epoch, position)
        seconds = time.perf_counter() - started
        if self.leader:
            log.write(step + 1, total, cfg.lr_at(step), norm, seconds)
        event = {"event": "step", "step": step + 1, "steps": cfg.steps, "loss": total, "lr": cfg.lr_at(step),
                 "grad_norm": norm, "seconds": seconds}
        if self.pipe.torch_device.type == "cuda":  # the step's peak, as a budget is judged
            event["gpu_gib"] = round(torch.cuda.max_memory_allocated(self.pipe.torch_device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(self.pipe.torch_device)
        self.on_event(event)

    # -- saving and resuming --------------------------------------------------------------------------------

    def adapter_modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name -> (down, up) as trained (fp32)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, param in self.params.items():
            module, _, which = key.rpartition(".")
            pairs.setdefault(module, {})[which] = param.detach().cpu()
        return {module: (pair["down"], pair["up"]) for module, pair in pairs.items()}

    def save(self) -> Path:
        """The LoRA file of this step (checked: every key loads back, not all zeros) and the state to resume from,
        both written whole or not at all; old step files beyond `keep` are removed."""
        cfg, step = self.config, self.progress.step
        meta = {f"qimg.train.{k}": str(v) for k, v in asdict(cfg).items()}
        meta["qimg.train.step"] = str(step)
        linears = model_linears(self.pipe.transformer)
        lora = save_lora(self.run_dir / f"lora-step{step:06d}.safetensors", self.adapter_modules(), rank=cfg.rank,
                         alpha=cfg.alpha, fmt=cfg.format, family=self.pipe.family.name, linears=linears,
                         metadata=meta)
        check_saved(lora, linears, self.pipe.family.name)
        shutil.copyfile(lora, self.run_dir / ".lora.tmp")
        os.replace(self.run_dir / ".lora.tmp", self.run_dir / "lora.safetensors")
        self._save_state()
        for old in sorted(self.run_dir.glob("lora-step*.safetensors"))[:-cfg.keep]:
            old.unlink()
        self.on_event({"event": "saved", "step": step, "path": str(lora)})
        return lora

    def _save_state(self) -> None:
        assert self.optimizer is not None
        states = self.run_dir / "state"
        states.mkdir(exist_ok=True)
        final = states / f"step-{self.progress.step:06d}"
        tmp = states / f".tmp-{self.progress.step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: p.detach().cpu().contiguous() for k, p in self.params.items()}, str(tmp / "adapter.safetensors"))
        opt = self.optimizer.state_dict()
        keys = list(self.params)
        tensors = {f"{keys[i]}/{name}": value.contiguous() for i, s in opt["state"].items()
                   for name, value in s.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        info = {"progress": asdict(self.progress), "config": asdict(self.config),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]}
        (tmp / "state.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(states / "latest.json", lambda f: f.write(json.dumps({"state": final.name}).encode()),
                     overwrite=True)
        for old in sorted(p for p in states.glob("step-*") if p != final):
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, state: dict[str, Any]) -> None:
        folder = Path(state["folder"])
        saved = load_file(str(folder / "adapter.safetensors"))
        if set(saved) != set(self.params):
            raise InputError(f"{folder} holds adapters for other modules than this run's",
                             hint="resume with the settings the run was started with")
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(saved[key])
        assert self.optimizer is not None
        tensors = load_file(str(folder / "optimizer.safetensors"))
        keys = list(self.params)
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            key, _, field = name.rpartition("/")
            opt_state.setdefault(keys.index(key), {})[field] = value
        groups = [{**g, "params": list(range(len(keys)))} for g in state["param_groups"]]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.progress = Progress(**state["progress"])


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _sum_over_ranks(params: Sequence[torch.nn.Parameter], loss: float) -> float:
    """Sum every adapter's gradient (and the step's loss) over the ranks, as one process accumulating all the
    micro-batches would hold them. A rank that reached no gradient for a parameter (Qwen-Image's last block feeds
    its text-side projections nowhere) sends zeros, so every rank runs the same collective without DDP's search
    for unused parameters; a parameter no rank reached keeps no gradient, as alone (AdamW then leaves it, weight
    decay included). One flat buffer: one all-reduce per step."""
    import torch.distributed as dist

    ref = params[0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    reached = torch.tensor([float(p.grad is not None) for p in params] + [loss], dtype=ref.dtype, device=ref.device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [reached])
    dist.all_reduce(flat)
    offset = 0
    for p, g, any_rank in zip(params, grads, flat[-len(params) - 1:-1].tolist(), strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if any_rank else None
        offset += n
    return float(flat[-1])


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The saved state a run resumes from (its folder, progress, config, optimizer groups), or None."""
    latest = run_dir / "state" / "latest.json"
    if not latest.is_file():
        return None
    try:
        folder = run_dir / "state" / json.loads(latest.read_text(encoding="utf-8"))["state"]
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{run_dir}/state is damaged", hint="start a new run in another folder") from None
    return {**info, "folder": str(folder)}


def resumed_config(config: TrainConfig, state: dict[str, Any], typed: Collection[str] | None = None
                   ) -> TrainConfig:
    """The config a resumed run uses. Its fixed settings (FIXED_ON_RESUME) are the saved run's: one given
    differently is an error (typed: the names the user gave, e.g. on the command line; the others are taken from
    the saved run; None: every one counts as given). Steps, learning rate and the rest may change, and the next
    save records them."""
    saved = state["config"]
    given = FIXED_ON_RESUME if typed is None else [name for name in FIXED_ON_RESUME if name in typed]
    changed = [name for name in given if saved.get(name) != getattr(config, name)]
    if changed:
        name = changed[0]
        raise UsageError(f"this run was started with {name} {saved.get(name)!r}, not {getattr(config, name)!r}; "
                         "a resumed run keeps it", hint="drop the option, or start a new run with another -o")
    known = {f.name for f in fields(TrainConfig)}
    return replace(config, **{k: v for k, v in saved.items() if k in known and k in FIXED_ON_RESUME})


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


class _Log:
    """RUN_DIR/log.csv: a row per step; a resumed run drops the rows past the step it resumes from."""

    FIELDS = ("step", "loss", "lr", "grad_norm", "seconds")

    def __init__(self, path: Path, resumed_at: int) -> None:
        self.path = path
        rows = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resumed_at]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{grad_norm:.6g}", f"{seconds:.4f}"])


def train_items(config: TrainConfig, ref: ModelRef) -> list[TrainItem]:
    """The dataset, checked whole before anything loads: captioned images for text-to-image models, (controls,
    target) pairs for edit models, each with no more controls than the model takes."""
    spec = ref.spec
    edit = spec.task == "edit"
    items = find_items(config.data, edit=edit, max_pixels=config.max_pixels)
    most = spec.max_images
    over = [item for item in items if edit and most is not None and len(item.controls) > most]
    if over:
        more = f" (and {len(over) - 1} more image{'s' * (len(over) > 2)})" if len(over) > 1 else ""
        raise DatasetError(f"{over[0].image} has {len(over[0].controls)} control images; {spec.name} takes at most "
                           f"{most}{more}", hint=f"keep at most {most} control{'s' * (most != 1)} per image, or train "
                                                 "an edit model that takes several (qwen-image-edit-2509, -2511)")
    return items


__all__ = ["TARGETS", "Progress", "TrainConfig", "Trainer", "read_state", "resumed_config", "train_items"]
