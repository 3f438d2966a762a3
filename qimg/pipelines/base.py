"""What every family's pipeline shares: runtime checks on the device, loading by a memory plan (the denoiser
block by block, the VAE, the schedule; the text encoder on first use), run phases, re-planning per request
shape, the VAE ends of a run, the one-line out-of-memory error, and the public generate / edit / run calls.

A family's pipeline subclasses Pipeline and supplies its prompt encoder and its two denoising runs
(`denoise_image`: text to image, img2img, inpaint; `denoise_edit`: with reference images).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import GPUMemoryError, InputError, NumericsError
from qimg.loading import components
from qimg.loading.hub import ModelRef
from qimg.loading.single_file import TransformerFile, file_sha256, fp8_notes, read_transformer_file
from qimg.pipelines import memory
from qimg.pipelines.common import Progress, latents_to_images
from qimg.pipelines.family import Family
from qimg.pipelines.guards import Phases, check_finite, parallel_plan, resolve_device
from qimg.request import DEFAULT_STRENGTH, GenerateRequest, check_task, make_request, request_shape, without_negative
from qimg.runtime.attention import use_attention
from qimg.runtime.compile import compile_blocks
from qimg.runtime.graphs import CudaGraphs
from qimg.runtime.kernels import use_fused_kernels
from qimg.runtime.modulation import ModulationTable
from qimg.runtime.offload import Offloaded, Residency
from qimg.runtime.options import RuntimeOptions, Tiling
from qimg.runtime.packaged import package_blocks, packages_apply, packages_work
from qimg.runtime.planner import MemoryPlan, Needs, PlanError, RequestShape
from qimg.runtime.tiling import decode_tiled, encode_tiled
from qimg.sampling import FlowSchedule, unpack
from qimg.version import __version__

if TYPE_CHECKING:
    from qimg.loading.lora import LoRAFile
    from qimg.pipelines.loras import LoRAs


def text_beside_denoiser(plan: MemoryPlan, device: torch.device) -> bool:
    """Whether the tokenizers and the text encoder load on a thread while the denoiser loads: when everything
    stays resident on a GPU, so that the reads overlap (a cron job's first image pays the longer of them, not
    their sum). A broken tokenizer then fails at the text phase, not before the denoiser loads."""
    return plan.mode == "none" and device.type == "cuda"


@dataclass
class Pipeline(abc.ABC):
    """A loaded model of some family; build it with qimg.load(). The text encoder loads on first use, so runs
    from saved prompt embeddings never load it."""

    ref: ModelRef
    family: Family
    options: RuntimeOptions
    transformer: nn.Module
    vae: Any
    schedule: FlowSchedule
    prompts: Any  # the family's prompt encoder: loaded, release, load_tokenizers, check_images, check_embeddings,
    # encode_request
    torch_device: torch.device
    torch_dtype: torch.dtype
    plan: MemoryPlan | None = None  # what stays on the GPU, what visits it per phase, what streams
    needs: Needs | None = None
    residency: Residency | None = None
    transformer_offload: Offloaded | None = None
    shape: RequestShape | None = None  # the request shape the plan was made for
    # Set by a trainer that placed the denoiser itself (streaming through backward): requests must not re-plan it.
    placement_fixed: bool = False
    keep_text_encoder: bool = True  # False: free it once a request's prompts are encoded
    # Told each stage of a run as it starts ("prompt", "encode", "denoise", "decode"), for progress displays.
    on_stage: Callable[[str], None] | None = None
    adapters: LoRAs | None = None  # LoRAs attached to the denoiser (made on the first load_lora)
    # ref.transformer read (a single-file transformer), and its sha256 for the PNG, hashed while the model loads.
    transformer_file: TransformerFile | None = None
    transformer_digest: Future[str] | None = None
    notes: tuple[str, ...] = ()  # what loading decided that a user may want to know (one line each)
    parallel: Any = None  # runtime/sequence_parallel.ParallelPlan: this rank's part in one image (--parallel)
    denoiser_graphs: CudaGraphs | None = None  # --cuda-graphs: the denoiser's calls, replayed from CUDA graphs
    modulation: ModulationTable | None = None  # the denoiser's modulation, looked up per run (resident only)

    prompt_encoder: ClassVar[Any] = None  # the family's prompt encoder class: (ref, family, device, dtype, ...)

    @classmethod
    def load(cls, ref: ModelRef, family: Family, options: RuntimeOptions, shape: RequestShape | None = None,
             loras: Sequence[tuple[str | Path, float]] = ()) -> Pipeline:
        """Load a model folder (its transformer weights from ref.transformer, one file, when set) as a memory plan
        for `shape` places it, then apply the runtime features asked for: the attention kernel (process-wide),
        FP8 linears, regional compile. loras: (path, scale) pairs applied as options.lora_mode says (merged into
        the weights as they load, or attached as side branches once loaded)."""
        dev, dt = resolve_device(options)
        parallel = parallel_plan(options)
        shape = shape or RequestShape()
        root = ref.path
        weights = None if ref.transformer is None else read_transformer_file(ref.transformer, family.name)
        fp8 = memory.stored_fp8_mode(options.fp8, weights)
        merged, deltas = [], None
        if loras:
            from qimg.pipelines.loras import read_for_merge  # LoRA code loads with the first LoRA

            merged, deltas = read_for_merge(loras, options.lora_mode, family, root / family.denoiser_folder,
                                            weights)
        try:
            memory.cap_process_memory(dev, options)
            plan, needs = memory.make_plan(family, root, ref.spec.task, dev, dt, options, shape, weights=weights)
        except PlanError as e:
            raise GPUMemoryError(str(e), hint=memory.fitting_flags(fp8)) from None
        digest, notes = None, []
        if weights is not None:
            pool = ThreadPoolExecutor(1)  # hashing a 20 GB file takes seconds: do it while the weights load
            digest = pool.submit(file_sha256, weights.path)
            pool.shutdown(wait=False)
            notes = fp8_notes(weights, options.fp8, lambda name: family.denoiser_fp8(name, None),  # type: ignore[arg-type]
                              str(dt).removeprefix("torch."))
        use_attention(options.attention, dev)
        use_fused_kernels(dev)  # before any loading: FP8 quantisation as the weights arrive uses them
        prompts = cls.prompt_encoder(ref, family, dev, dt, fp8=options.fp8, plan=plan, residency=None)
        if shape.text_encoder and not text_beside_denoiser(plan, dev):
            prompts.load_tokenizers()  # small files, read first: a broken one fails before gigabytes load
        try:
            vae = family.load_vae(root / "vae", dev, dt)
            # The text encoder's thread starts once the VAE is in: its tokenizer parsing and imports hold the GIL
            # for long stretches, and the VAE's few hundred small steps took 1.4 s beside them on an H200 host
            # (bench/results/stack_sampler_lightning8_eager_pyc_h200.json; 0.07-0.25 s alone on a 2-core CPU).
            if shape.text_encoder and text_beside_denoiser(plan, dev):
                prompts.load_in_background()
            transformer, offloaded = memory.load_denoiser(family, root / family.denoiser_folder, dev, dt, plan,
                                                          fp8=options.fp8, weights=weights, merge=deltas)
        except torch.OutOfMemoryError as e:
            raise memory.out_of_memory(family, ref, dev, dt, fp8) from e
        packaged = options.compile and packages_apply(offloaded is None, parallel) and packages_work(dev)
        modulation = None
        if family.modulation is not None and offloaded is None and parallel is None and not packaged:
            modulation = ModulationTable(transformer, family.modulation)  # a package computes its own
        if options.compile:
            # The denoiser's blocks only. A compiled VAE decoder saves ~22 ms an image (37 -> 15 ms on an H100) but
            # costs each new process ~1 s of tracing with a warm cache (11 s cold; first_image_*_h200.json): a
            # loss until a run decodes ~45 images.
            blocks = family.denoiser_blocks.modules(transformer)
            if packaged:
                package_blocks(blocks)
            else:
                compile_blocks(blocks)
        graphs = None
        if options.cuda_graphs:
            if offloaded is None and parallel is None:
                graphs = CudaGraphs(transformer)
            else:
                why = "streams through the GPU" if offloaded is not None else "is shared between processes (--parallel)"
                notes = [*notes, f"--cuda-graphs is off: the denoiser {why}; graphs need it whole on one GPU"]
        residency = None if offloaded is None else Residency({"transformer": offloaded}, plan.phases)
        pipe = cls(
            ref=ref, family=family, options=options, transformer=transformer, vae=vae,
            schedule=components.load_schedule(root / "scheduler"),
            prompts=dataclasses.replace(prompts, residency=residency),
            torch_device=dev, torch_dtype=dt, plan=plan, needs=needs, residency=residency,
            transformer_offload=offloaded, shape=shape, transformer_file=weights, transformer_digest=digest,
            notes=tuple(notes), parallel=parallel, denoiser_graphs=graphs, modulation=modulation,
        )
        for path, strength, lora in merged:
            pipe._loras().record_merged(path, strength, lora)
        if loras and not merged:
            pipe.apply_loras(loras)
        return pipe

    # -- the family's part --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def denoise_image(self, request: GenerateRequest, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                      init_image: Any, mask: Any, progress: Progress | None) -> Tensor:
        """Packed latent tokens (1, L, 4C) for a text-to-image, img2img or inpaint request."""

    @abc.abstractmethod
    def denoise_edit(self, request: GenerateRequest, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                     images: Sequence[Any], progress: Progress | None) -> Tensor:
        """Packed latent tokens (1, L, 4C) for an edit request with its reference images."""

    @abc.abstractmethod
    def check_embeddings(self, embeddings: EmbeddingsFile, images: Sequence[Any] = ()) -> None:
        """Refuse saved prompt embeddings this model cannot use (another family, template, width or images)."""

    # -- LoRA ---------------------------------------------------------------------------------------------------

    def _loras(self) -> LoRAs:
        from qimg.pipelines.loras import LoRAs  # read and attach code loads with the first LoRA

        if self.adapters is None:
            self.adapters = LoRAs(self.transformer, self.family.denoiser_blocks, self.family.name, self.torch_dtype,
                                  self.transformer_offload)
        return self.adapters

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> LoRAFile:
        """Attach a LoRA file (any dialect the family reads) at `scale` under `name` (default: the file's stem).
        Several stack; returns what was read (file.summary(), file.unmatched)."""
        self._forget_graphs()
        return self._loras().load(path, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change an attached LoRA's scale (0 turns it off exactly; negative subtracts it)."""
        self._forget_graphs()  # a scale of 0 skips the branch: which kernels run changes
        self._loras().set_strength(name, scale)

    def unload_lora(self, name: str) -> None:
        """Remove an attached LoRA; the base weights are exactly as before it was loaded."""
        self._forget_graphs()
        self._loras().unload(name)

    def apply_loras(self, wanted: Sequence[tuple[str | Path, float]]) -> list[LoRAFile]:
        """Make the attached LoRAs exactly `wanted` ((path, scale) pairs); returns the files newly read."""
        if not wanted and self.adapters is None:
            return []
        before = self._loras().params()
        try:
            return self._loras().apply(wanted)
        finally:
            if self._loras().params() != before:  # a prompt file's lines often keep the same set
                self._forget_graphs()

    def _forget_graphs(self) -> None:
        """Captured graphs call the modules they saw: a LoRA attached, removed or switched makes them stale."""
        if self.denoiser_graphs is not None:
            self.denoiser_graphs.clear()

    @property
    def denoiser_forward(self) -> Callable[..., Tensor]:
        """What the samplers call for a velocity: the denoiser, or its replays from CUDA graphs (--cuda-graphs)."""
        return self.transformer if self.denoiser_graphs is None else self.denoiser_graphs

    # -- shared -----------------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    @property
    def fp8_mode(self) -> str | None:
        """The denoiser's FP8 mode: the one asked for, or "weights" when its single file stores FP8 linears."""
        return memory.stored_fp8_mode(self.options.fp8, self.transformer_file)

    def weights_params(self) -> dict[str, str]:
        """What a PNG records about a single-file transformer: its path and short sha256 (nothing without one)."""
        if self.transformer_file is None:
            return {}
        params = {"transformer": str(self.transformer_file.path)}
        try:
            digest = self.transformer_digest or None
            params["transformer_sha256"] = digest.result() if digest else file_sha256(self.transformer_file.path)
        except OSError:  # the file went away after loading: the image is still good, its hash unknown
            pass
        return params

    @property
    def text_encoder_loaded(self) -> bool:
        return self.prompts.loaded

    @property
    def tiling(self) -> Tiling | None:
        """The VAE tiling asked for, or the default tiles when the memory plan needs them."""
        if self.options.vae_tiling is None and self.plan is not None and self.plan.vae_tiling:
            return Tiling()
        return self.options.vae_tiling

    def encode_prompts(
        self, request: GenerateRequest, *, with_negative: bool = True, images: Sequence[Any] = ()
    ) -> EmbeddingsFile:
        """The positive and (if asked and given) negative embeddings of a request, with their provenance."""
        return self.prompts.encode_request(request, with_negative=with_negative, images=images)

    def phase(self, name: str) -> None:
        """Enter a run phase (text, vae, denoise): under an offload plan, move components on and off the GPU."""
        if self.residency is not None:
            self.residency.enter(name)
        if name == "denoise":
            self.stage("denoise")

    def stage(self, name: str) -> None:
        """Say which stage of a run starts ("prompt", "encode", "denoise", "decode") to on_stage, if set."""
        if self.on_stage is not None:
            self.on_stage(name)

    def encode_image(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, H, W) in [-1, 1] -> VAE posterior (mean, logvar) in the VAE's latent space."""
        self.stage("encode")
        self.phase("vae")
        x = x.to(self.torch_device, self.torch_dtype)
        return self.vae.encode(x) if self.tiling is None else encode_tiled(self.vae, x, self.tiling)

    def decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Packed latent tokens (B, L, 4C) -> images (B, 3, H, W) in [-1, 1]."""
        self.stage("decode")
        self.phase("vae")
        f = 2 * self.vae.scale_factor  # pixels per token: the VAE's factor, then 2x2 patches
        z = self.vae.denormalize(unpack(x, 2 * (height // f), 2 * (width // f)).to(self.torch_dtype))
        return self.vae.decode(z) if self.tiling is None else decode_tiled(self.vae, z, self.tiling)

    def fit(self, shape: RequestShape) -> None:
        """Re-plan the streamed blocks for a request shape other than the one planned for at load; the offload
        mode chosen at load stays."""
        if (self.plan is None or self.plan.mode == "none" or self.needs is None or shape == self.shape
                or self.placement_fixed):
            return
        try:
            plan, needs = memory.make_plan(self.family, self.ref.path, self.ref.spec.task, self.torch_device,
                                           self.torch_dtype, self.options, shape, keep=self.plan,
                                           weights=self.transformer_file)
        except PlanError as e:
            hint = memory.fitting_flags(self.fp8_mode)
            raise GPUMemoryError(f"{shape.width}x{shape.height}: {e}", hint=hint) from None
        if self.transformer_offload is not None:
            self.transformer_offload.stream(plan.streamed.get("transformer", ()))
        self.plan, self.needs, self.shape = plan, needs, shape
        if self.residency is not None:
            self.residency.phases = plan.phases

    def shape_of(self, request: GenerateRequest, n_images: int = 0, embeddings: bool = False) -> RequestShape:
        """The memory shape of a request (edit models: its reference images at the spec's VAE area)."""
        return request_shape(self.ref.spec, request, n_images, embeddings)

    @contextlib.contextmanager
    def _oom_as_error(self) -> Iterator[None]:
        """A CUDA out-of-memory error becomes one line naming the flags that would fit this GPU."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise memory.out_of_memory(self.family, self.ref, self.torch_device, self.torch_dtype, self.fp8_mode) from e

    def _request(
        self, prompt: str | None, embeddings: EmbeddingsFile | None, init_size: Any, img2img: bool,
        options: dict[str, Any],
    ) -> GenerateRequest:
        """A request from keyword options; with saved embeddings the prompts default to the ones they hold."""
        if embeddings is not None and prompt is None:
            prompt = embeddings.meta.get("prompt", "")
            options.setdefault("negative", embeddings.meta.get("negative"))
        return make_request(self.ref.spec, prompt or "", init_size=init_size, img2img=img2img, **options)[0]

    def _conditioning(
        self, request: GenerateRequest, embeddings: EmbeddingsFile | None, images: Sequence[Any] = ()
    ) -> tuple[GenerateRequest, PromptEmbeds, PromptEmbeds | None, dict[str, Any]]:
        """Prompt embeddings from the text encoder, or from a saved file (checked against this model), and the
        parameters to record about them: how many prompt tokens the max_sequence_length cut dropped, if any."""
        if embeddings is None:
            self.stage("prompt")
            data = self.encode_prompts(request, with_negative=request.cfg_enabled, images=images)
            for part in (data.cond, data.uncond):
                if part is not None:
                    check_finite(part.embeds, "the text encoder", self.torch_dtype, self.prompts.model_if_loaded)
            if not self.keep_text_encoder:
                self.prompts.release()
            return request, data.cond, data.uncond, dropped_params(data, data.uncond is not None)
        self.check_embeddings(embeddings, images)
        for part in (embeddings.cond, embeddings.uncond):
            if part is not None and not bool(torch.isfinite(part.embeds.float()).all()):
                raise NumericsError("the saved prompt embeddings hold NaN or infinite values",
                                    hint="make them again with: qimg encode-prompt")
        request = without_negative(request, embeddings)
        uncond = embeddings.uncond if request.cfg_enabled else None
        extra = dropped_params(embeddings, uncond is not None)
        return request, embeddings.cond.to(self.torch_device), uncond and uncond.to(self.torch_device), extra

    def _finish(self, request: GenerateRequest, x: Tensor, started: float, phases: Phases, **extra: Any) -> list[Any]:
        images = latents_to_images(self.decode(x, request.height, request.width))
        phases.mark("decode")
        params = {
            **request.as_dict(),
            "cfg_enabled": request.cfg_enabled,
            "model": self.ref.name,
            **self.weights_params(),
            "model_family": self.ref.spec.family,
            "dtype": self.dtype,
            "qimg_version": __version__,
            **extra,
            "seconds": round(time.perf_counter() - started, 3),
            "timings": phases.seconds,  # place (memory plan moves), text, denoise, decode; not replayed
        }
        if request.guidance is None:
            params.pop("guidance")  # families without distilled guidance record nothing about it
        if self.adapters is not None and self.adapters.attached:
            params["loras"] = self.adapters.params()
        for image in images:
            image.info["qimg"] = params
        return images

    def generate(
        self,
        prompt: str | None = None,
        *,
        request: GenerateRequest | None = None,
        init_image: Any = None,
        mask: Any = None,
        embeddings: EmbeddingsFile | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> list[Any]:
        """Text to image, or image to image with `init_image` (PIL) and options["strength"], inpainting the
        white part of `mask` (PIL) when given. Give a prompt and options (negative, seed, steps, cfg, guidance,
        width, height, max_sequence_length, strength), or a prepared `request`; `embeddings` (from
        encode-prompt) replace the text encoder. Returns PIL images; image.info["qimg"] holds the parameters."""
        check_task(self.ref.spec, self.ref.name, "t2i")
        if mask is not None and init_image is None:
            raise InputError("a mask needs an init image", hint="pass --init-image together with --mask")
        if request is None:
            init_size = None if init_image is None else init_image.size
            request = self._request(prompt, embeddings, init_size, init_image is not None, options)
        elif init_image is not None and request.strength is None:
            request = dataclasses.replace(request, strength=DEFAULT_STRENGTH)
        started, phases = time.perf_counter(), Phases(self.torch_device)
        with torch.inference_mode(), self._oom_as_error():
            self.fit(self.shape_of(request, embeddings=embeddings is not None))
            phases.mark("place")
            request, cond, uncond, extra = self._conditioning(request, embeddings)
            phases.mark("text")
            x = self.denoise_image(request, cond, uncond, init_image, mask, progress)
            x = check_finite(x, "the sampler", self.torch_dtype, self.transformer)
            phases.mark("denoise")
            return self._finish(request, x, started, phases, **extra)

    def edit(
        self,
        prompt: str | None = None,
        images: Sequence[Any] = (),
        *,
        request: GenerateRequest | None = None,
        keep_size: bool = False,
        embeddings: EmbeddingsFile | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> list[Any]:
        """Edit `images` (PIL; as many as the model takes) as the prompt says.

        The output size defaults to about 1 MP at the aspect of the last image, as diffusers does; keep_size
        resamples the result to the first image's exact size. Options as generate (no strength)."""
        check_task(self.ref.spec, self.ref.name, "edit")
        self.prompts.check_images(images)
        if request is None:
            request = self._request(prompt, embeddings, images[-1].size if images else None, False, options)
        started, phases = time.perf_counter(), Phases(self.torch_device)
        with torch.inference_mode(), self._oom_as_error():
            self.fit(self.shape_of(request, len(images), embeddings is not None))
            phases.mark("place")
            request, cond, uncond, extra = self._conditioning(request, embeddings, images)
            phases.mark("text")
            x = self.denoise_edit(request, cond, uncond, images, progress)
            x = check_finite(x, "the sampler", self.torch_dtype, self.transformer)
            phases.mark("denoise")
            out = self._finish(request, x, started, phases, keep_size=keep_size, **extra)
        if keep_size and out[0].size != images[0].size:
            from PIL import Image

            info = out[0].info
            out = [im.resize(images[0].size, Image.Resampling.LANCZOS) for im in out]
            for im in out:
                im.info.update(info)
        return out

    def run(self, job: Any, progress: Progress | None = None, *, keep_text_encoder: bool = False,
            on_stage: Callable[[str], None] | None = None) -> list[Any]:
        """Run a prepared job (qimg.prepare_generate / prepare_edit); the job's paths go into the metadata.
        Unless keep_text_encoder, the text encoder is freed once the job's prompts are encoded (one image).
        on_stage is told each stage as it starts (see Pipeline.stage)."""
        if getattr(job, "loras", None) is not None:
            self.apply_loras(job.loras)
        kept, self.keep_text_encoder = self.keep_text_encoder, keep_text_encoder
        told, self.on_stage = self.on_stage, on_stage or self.on_stage
        try:
            images = getattr(self, job.method)(request=job.request, progress=progress, **job.inputs)
        finally:
            self.keep_text_encoder, self.on_stage = kept, told
        for image in images:
            image.info.setdefault("qimg", {}).update(job.extra)
        return images


def dropped_params(data: EmbeddingsFile, with_negative: bool) -> dict[str, int]:
    """prompt_tokens_dropped / negative_tokens_dropped for the image parameters, from the embeddings' meta (only
    the non-zero counts, and the negative's only when it conditions the run)."""
    dropped = data.meta.get("dropped_tokens") or {}
    params = {"prompt_tokens_dropped": dropped.get("prompt", 0)}
    if with_negative:
        params["negative_tokens_dropped"] = dropped.get("negative", 0)
    return {key: n for key, n in params.items() if n}
