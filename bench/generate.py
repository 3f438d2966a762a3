"""Whole text-to-image runs, qimg vs diffusers in one process on the same random full-size weights.

    python bench/generate.py --tokenizer DIR --out bench/results/generate_h100.json

Qwen-Image at 1024x1024, 50 steps, true CFG 4 with negative " ": the 7B Qwen2.5-VL text encoder, the 20B MMDiT
and the VAE all run (random weights, bf16, shared between the two pipelines). Rows: diffusers eager and with its
regional compile; qimg eager, compiled, and compiled with FP8 compute (then with --cuda-graphs), as
`qimg.load` sets a pipeline up: fused kernels on, the modulation table (runtime/modulation.py) in place. Seconds
per image (after a short warm-up run that pays for compilation), seconds per denoising step, peak GiB. DIR holds
the Qwen2 tokenizer (the tests rebuild it offline; see tests/fixtures.py build_qwen_tokenizer).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fp8_compute_copy  # noqa: E402
from qimg.families.qwen import QWEN_IMAGE  # noqa: E402
from qimg.loading import keymaps  # noqa: E402
from qimg.loading.hub import ModelRef  # noqa: E402
from qimg.nets.qwen_mmdit import QwenMMDiT  # noqa: E402
from qimg.nets.qwen_vae import QwenVAE  # noqa: E402
from qimg.pipelines.prompts import QwenPromptEncoder  # noqa: E402
from qimg.pipelines.qwen import QwenImagePipeline  # noqa: E402
from qimg.runtime.attention import use_attention  # noqa: E402
from qimg.runtime.compile import compile_blocks  # noqa: E402
from qimg.runtime.graphs import CudaGraphs  # noqa: E402
from qimg.runtime.kernels import use_fused_kernels  # noqa: E402
from qimg.runtime.modulation import ModulationTable  # noqa: E402
from qimg.runtime.options import RuntimeOptions  # noqa: E402
from qimg.sampling import FlowSchedule  # noqa: E402
from qimg.specs import SPECS, QwenMMDiTParams, QwenVAEParams  # noqa: E402

PROMPT = ("A coffee shop entrance features a chalkboard sign reading 'Qwen Coffee $2 per cup', with a neon light "
          "beside it displaying 'qimg'. Next to it hangs a poster showing a beautiful Chinese woman. Ultra HD, 4K.")
QWEN_SCHEDULE = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                     shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def text_encoder_config():
    from transformers import Qwen2_5_VLConfig

    # Qwen2.5-VL-7B-Instruct's published shape (the Qwen-Image text encoder).
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                         max_position_embeddings=128000,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def build_pipelines(tokenizer_dir: Path, diffusers_schedule: dict) -> tuple:
    """diffusers' QwenImagePipeline (its scheduler from `diffusers_schedule`) and qimg's on the very same random
    full-size weights in bf16 on the GPU: (dpipe, qpipe, diffusers' MMDiT, qimg's MMDiT). qimg keeps its own
    schedule (the request's preset may override it); the MMDiT is shared by assignment, the VAE through the
    checkpoint transform."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers import QwenImagePipeline as DPipe
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        transformer = QwenImageTransformer2DModel()
        vae = AutoencoderKLQwenImage()
        te_config = text_encoder_config()
        text_encoder = Qwen2_5_VLForConditionalGeneration._from_config(te_config, dtype=dtype)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in list(transformer.parameters()) + list(vae.parameters()):
            p.normal_(0.0, 0.02)
    for m in (transformer, vae, text_encoder):
        m.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dpipe = DPipe(FlowMatchEulerDiscreteScheduler(**diffusers_schedule), vae, text_encoder, tokenizer, transformer)
    dpipe.set_progress_bar_config(disable=True)
    with torch.device("meta"):
        ours_t = QwenMMDiT(QwenMMDiTParams())
        ours_v = QwenVAE(QwenVAEParams())
    ours_t.load_state_dict(transformer.state_dict(), assign=True)
    vae_state = {k: keymaps.qwen_vae_tensor(k, v) for k, v in vae.state_dict().items() if "time_conv" not in k}
    ours_v.load_state_dict(vae_state, assign=True)
    ours_v = ours_v.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    folder = Path(tempfile.mkdtemp()) / "model"
    (folder / "text_encoder").mkdir(parents=True)
    te_config.save_pretrained(folder / "text_encoder")  # what the embeddings metadata fingerprints
    ref = ModelRef(folder, SPECS["qwen-image"], "random-full-size")
    prompts = QwenPromptEncoder(ref, QWEN_IMAGE, dev, dtype, _model=text_encoder, _tokenizer=tokenizer)
    qpipe = QwenImagePipeline(ref, QWEN_IMAGE, RuntimeOptions(device="cuda"), ours_t.eval().requires_grad_(False),
                              ours_v, FlowSchedule(**QWEN_SCHEDULE), prompts, dev, dtype)
    assert QWEN_IMAGE.modulation is not None
    qpipe.modulation = ModulationTable(ours_t, QWEN_IMAGE.modulation)
    return dpipe, qpipe, transformer, ours_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip", default="",
                    help="rows to skip: d-eager,d-compiled,q-eager,q-compiled,q-fp8,q-fp8-graphs")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    dev = torch.device("cuda")
    dpipe, qpipe, transformer, ours_t = build_pipelines(args.tokenizer, QWEN_SCHEDULE)

    rows: dict[str, dict] = {}

    def save() -> None:
        report = {"benchmark": "qwen-image generate 1024x1024, 50 steps, true CFG 4, text encoder + VAE included",
                  "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                  "diffusers": __import__("diffusers").__version__, "command": " ".join(["python", *sys.argv]),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def run(name: str, call) -> None:
        call(2)  # warm-up: compilation, cuDNN plans, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stamps: list[float] = []
        started = time.perf_counter()
        call(args.steps, stamps)
        torch.cuda.synchronize()
        total = time.perf_counter() - started
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        rows[name] = {"s_per_image": round(total, 3), "s_per_step": per_step and round(per_step, 4),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        print(name, json.dumps(rows[name]), flush=True)
        save()

    def diffusers_call(steps: int, stamps: list | None = None) -> None:
        def on_step(pipe, i, t, kwargs):
            if stamps is not None:
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
            return kwargs

        dpipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps, height=1024,
              width=1024, generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step)

    def qimg_call(steps: int, stamps: list | None = None) -> None:
        def on_step(i: int, n: int) -> None:
            if stamps is not None:
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())

        qpipe.generate(PROMPT, seed=0, steps=steps, progress=on_step)

    with torch.inference_mode():
        if "d-eager" not in skip:
            run("diffusers eager", diffusers_call)
        use_attention("auto", dev)
        use_fused_kernels(dev)
        if "q-eager" not in skip:
            run("qimg eager", qimg_call)
        if "q-compiled" not in skip:
            compile_blocks(ours_t.transformer_blocks)
            run("qimg compiled", qimg_call)
        if "d-compiled" not in skip:
            transformer.compile_repeated_blocks(fullgraph=True)
            run("diffusers compiled", diffusers_call)
        if "q-fp8" not in skip:
            # Drop diffusers' hold on the bf16 MMDiT so FP8 replaces it rather than sitting beside it.
            dpipe.transformer = None
            del transformer
            gc.collect()
            qpipe.transformer = fp8_compute_copy(ours_t)
            del ours_t
            qpipe.modulation = None
            gc.collect()
            torch.cuda.empty_cache()
            assert QWEN_IMAGE.modulation is not None
            qpipe.modulation = ModulationTable(qpipe.transformer, QWEN_IMAGE.modulation)
            compile_blocks(qpipe.transformer.transformer_blocks)
            run("qimg compiled fp8", qimg_call)
            if "q-fp8-graphs" not in skip:
                qpipe.denoiser_graphs = CudaGraphs(qpipe.transformer)
                run("qimg compiled fp8 cuda-graphs", qimg_call)
    save()


if __name__ == "__main__":
    main()
