"""The catalogue of bad inputs and faults: what a user gets for each, held by tests/bad_inputs/test_catalogue.py
and listed in docs/errors.md (written from this table: python -m tests.bad_inputs.catalogue).

Each case runs one qimg command against tiny models and files the test writes. {model} is a tiny Qwen-Image
folder (damaged by the case's setup where it says so), {edit} a tiny Qwen-Image-Edit folder, {out} the output
path, {tmp} the case's folder. The test asserts the exit code, that the first line of stderr holds `first`,
that no traceback is printed, and that no file was created or changed anywhere the command could write.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_NAMES = {1: "1 (qimg error)", 2: "2 (usage)", 130: "130 (interrupted)"}


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # for people: what is wrong
    argv: tuple[str, ...]
    code: int
    first: str  # a part of stderr's first line
    setup: str = ""  # a setup in test_catalogue.SETUPS: writes files, damages the model copy, patches a fault


def _g(*args: str) -> tuple[str, ...]:
    return ("generate", "a red fox", "--model", "{model}", "-o", "{out}", "--device", "cpu", "--steps", "1",
            "--width", "32", "--height", "32", *args)


def _t(*args: str) -> tuple[str, ...]:
    return ("train-lora", "--model", "{model}", "--data", "{tmp}/data", "-o", "{tmp}/run", "--device", "cpu",
            "--resolution", "256", "--steps", "1", *args)


CASES: tuple[Case, ...] = (
    # -- the model --------------------------------------------------------------------------------------------
    Case("model-missing", "the model folder does not exist", _g("--model", "{tmp}/nowhere"), 1, "does not exist"),
    Case("model-none", "no --model and no QIMG_MODEL", ("generate", "a fox", "-o", "{out}"), 2, "no model given"),
    Case("model-unknown-name", "a model name that is neither an alias nor a folder",
         _g("--model", "qwen-image-9000"), 1, "qwen-image-9000"),
    Case("model-not-downloaded", "a known model that is not in the caches", _g("--model", "qwen-image"), 1,
         "not downloaded"),
    Case("model-no-index", "the folder has no model_index.json", _g(), 1, "model_index.json",
         setup="remove_model_index"),
    Case("model-index-corrupt", "model_index.json is not JSON", _g(), 1, "model_index.json",
         setup="corrupt_model_index"),
    Case("model-other-pipeline", "model_index.json names a pipeline qimg does not run", _g(), 1,
         "cannot run", setup="foreign_pipeline"),
    Case("model-missing-component", "the vae/ component is missing", _g(), 1, "missing its vae/ component",
         setup="remove_vae"),
    Case("weights-empty", "the transformer's weights file is empty", _g(), 1, "not a readable safetensors",
         setup="empty_weights"),
    Case("weights-truncated", "the transformer's weights file is cut short", _g(), 1,
         "not a readable safetensors", setup="truncate_weights"),
    Case("weights-shard-missing", "a shard named in the index is missing", _g(), 1, "missing 1 shard",
         setup="missing_shard"),
    Case("weights-tensor-missing", "a tensor the network needs is not in the file", _g(), 1, "1 missing",
         setup="drop_tensor"),
    Case("weights-tensor-unexpected", "the file holds a tensor the network does not have", _g(), 1,
         "1 unexpected", setup="extra_tensor"),
    Case("weights-int32", "weights stored as int32", _g(), 1, "not floating point", setup="int32_weights"),
    Case("weights-nan", "the weights hold NaN", _g(), 1, "weights hold NaN", setup="nan_weights"),
    Case("config-no-num-layers", "transformer/config.json lacks num_layers", _g(), 1, "lacks num_layers",
         setup="config_without_layers"),
    Case("config-corrupt", "transformer/config.json is not JSON", _g(), 1, "not readable JSON",
         setup="corrupt_config"),
    Case("tokenizer-corrupt", "tokenizer/tokenizer.json is damaged", _g(), 1, "tokenizer.json",
         setup="corrupt_tokenizer"),
    Case("text-encoder-pickle", "the text encoder ships only pytorch_model.bin", _g(), 1, "never unpickles",
         setup="pickled_text_encoder"),
    Case("edit-model-for-generate", "an edit model asked to generate from text",
         _g("--model", "{edit}"), 2, "is an edit model"),
    Case("edit-model-not-downloaded", "an edit model asked to generate, not downloaded either",
         _g("--model", "qwen-image-edit"), 2, "is an edit model"),
    Case("t2i-model-for-edit", "a text-to-image model asked to edit",
         ("edit", "a hat", "-i", "{tmp}/in.png", "--model", "{model}", "-o", "{out}", "--device", "cpu"), 2,
         "is a text-to-image model", setup="input_image"),
    Case("edit-too-many-images", "two images to Qwen-Image-Edit, which takes one",
         ("edit", "a hat", "-i", "{tmp}/in.png", "-i", "{tmp}/in.png", "--model", "{edit}", "-o", "{out}",
          "--device", "cpu"), 2, "takes 1 to at most 1 input images, got 2", setup="input_image"),
    Case("encode-prompt-images-to-t2i", "encode-prompt with input images for a text-to-image model",
         ("encode-prompt", "a fox", "-i", "{tmp}/in.png", "--model", "{model}", "-o", "{tmp}/e.safetensors"), 2,
         "takes no input images", setup="input_image"),
    # -- the request ------------------------------------------------------------------------------------------
    Case("prompt-empty", "an empty prompt", ("generate", "", "--model", "{model}", "-o", "{out}"), 1,
         "the prompt is empty"),
    Case("steps-zero", "--steps 0", _g("--steps", "0"), 1, "--steps must be between 1 and 1000"),
    Case("steps-huge", "--steps 1000000000 (once grew memory until the OOM killer)", _g("--steps", "1000000000"),
         1, "--steps must be between 1 and 1000"),
    Case("cfg-negative", "--cfg -1", _g("--cfg", "-1"), 1, "--cfg must be between 0 and 100"),
    Case("cfg-huge", "--cfg 1e308 (overflowed to inf, blamed on float16)", _g("--cfg", "1e308"), 1,
         "--cfg must be between 0 and 100"),
    Case("cfg-nan", "--cfg nan", _g("--cfg", "nan"), 1, "--cfg must be between 0 and 100"),
    Case("width-small", "--width 8", _g("--width", "8"), 1, "width 8 is out of range"),
    Case("width-huge", "--width 100000", _g("--width", "100000"), 1, "width 100000 is out of range"),
    Case("seed-negative", "--seed -1", _g("--seed", "-1"), 1, "--seed must be between 0 and"),
    Case("seed-huge", "--seed 2^64", _g("--seed", str(2**64)), 1, "--seed must be between 0 and"),
    Case("strength-zero", "--strength 0 with an init image", _g("--init-image", "{tmp}/in.png", "--strength", "0"),
         1, "--strength must be in (0, 1]", setup="input_image"),
    Case("strength-large", "--strength 1.5", _g("--init-image", "{tmp}/in.png", "--strength", "1.5"), 1,
         "--strength must be in (0, 1]", setup="input_image"),
    Case("strength-without-init", "--strength without --init-image", _g("--strength", "0.5"), 2,
         "need --init-image"),
    Case("mask-without-init", "--mask without --init-image", _g("--mask", "{tmp}/in.png"), 2, "need --init-image",
         setup="input_image"),
    Case("sequence-length-zero", "--max-sequence-length 0", _g("--max-sequence-length", "0"), 1,
         "max_sequence_length must be between 1 and 1024"),
    # -- runtime options ----------------------------------------------------------------------------------------
    Case("device-malformed", "--device tpu", _g("--device", "tpu"), 2, "is not one of cpu, cuda, cuda:N"),
    Case("device-no-gpu", "--device cuda on a machine without a GPU", _g("--device", "cuda"), 1,
         "no CUDA GPU is visible"),
    Case("dtype-unknown", "--dtype float64", _g("--dtype", "float64"), 2, "Invalid value for '--dtype'"),
    Case("vram-budget-tiny", "--vram-budget 0.1", _g("--vram-budget", "0.1"), 2, "--vram-budget 0.1 is not"),
    Case("vram-budget-on-cpu", "--vram-budget 8 on the CPU", _g("--vram-budget", "8"), 1,
         "--vram-budget 8 manages GPU memory"),
    Case("offload-on-cpu", "--offload layer on the CPU", _g("--offload", "layer"), 1,
         "--offload layer manages GPU memory"),
    Case("text-encoder-cuda-on-cpu", "--text-encoder-device cuda on the CPU", _g("--text-encoder-device", "cuda"),
         1, "needs a CUDA device"),
    Case("fp8-compute-on-cpu", "--fp8 compute without an FP8 GPU", _g("--fp8", "compute"), 1,
         "--fp8 compute needs an FP8 GPU"),
    Case("cuda-graphs-on-cpu", "--cuda-graphs on the CPU", _g("--cuda-graphs"), 1,
         "--cuda-graphs needs a CUDA device"),
    Case("attention-missing-kernel", "--attention sage without the sageattention package",
         _g("--attention", "sage"), 1, "needs the sageattention package"),
    Case("tile-size-odd", "--tile-size 100 (not a multiple of 8)", _g("--tile-size", "100"), 1,
         "is not a multiple of 8"),
    Case("tile-overlap-large", "--tile-overlap 512 --tile-size 512", _g("--tile-size", "512", "--tile-overlap",
         "512"), 1, "must be smaller than the tile size"),
    # -- the output -------------------------------------------------------------------------------------------
    Case("output-exists", "the output file exists (no --overwrite)", _g(), 1, "already exists",
         setup="existing_output"),
    Case("output-is-folder", "-o names a folder", _g("-o", "{tmp}/dir.png"), 1, "is a folder", setup="png_folder"),
    Case("output-folder-missing", "-o in a folder that does not exist", _g("-o", "{tmp}/no/such/a.png"), 1,
         "does not exist"),
    Case("output-not-png", "-o out.jpg", _g("-o", "{tmp}/out.jpg"), 1, "does not end in .png"),
    Case("output-bare-suffix", "-o .png", _g("-o", "{tmp}/.png"), 1, "has no file name before .png"),
    Case("output-control-chars", "-o with a newline in the name", _g("-o", "{tmp}/a\nb.png"), 1,
         "holds control characters"),
    Case("output-name-too-long", "a 300-character output name", _g("-o", "{tmp}/" + "n" * 300 + ".png"), 1,
         "bytes; this folder takes names of at most"),
    Case("output-read-only", "the output folder refuses writes", _g(), 1, "is not writable",
         setup="read_only_folder"),
    Case("output-disk-full", "the disk fills up while writing the PNG", _g(), 1, "No space left on device",
         setup="disk_full"),
    # -- prompt files -----------------------------------------------------------------------------------------
    Case("prompts-missing", "--prompts names a file that does not exist",
         ("generate", "--prompts", "{tmp}/none.txt", "--model", "{model}", "-o", "{tmp}/batch"), 2,
         "does not exist"),
    Case("prompts-bad-json", "a JSONL line that is not JSON",
         ("generate", "--prompts", "{tmp}/p.jsonl", "--model", "{model}", "-o", "{tmp}/batch"), 2, "p.jsonl:2",
         setup="bad_jsonl"),
    Case("prompts-bad-seed", "a JSONL line with a negative seed",
         ("generate", "--prompts", "{tmp}/seed.jsonl", "--model", "{model}", "-o", "{tmp}/batch"), 2,
         'seed.jsonl:1: "seed" must be between 0 and', setup="bad_seed_jsonl"),
    Case("prompts-output-png", "--prompts with -o naming a PNG, not a folder",
         ("generate", "--prompts", "{tmp}/p.txt", "--model", "{model}", "-o", "{out}"), 2,
         "with --prompts, -o names a folder", setup="prompts_txt"),
    Case("prompts-format-alone", "--prompts-format without --prompts", _g("--prompts-format", "csv"), 2,
         "--prompts-format needs --prompts"),
    Case("prompts-with-prompt", "--prompts together with a PROMPT",
         ("generate", "a fox", "--prompts", "{tmp}/p.txt", "--model", "{model}", "-o", "{tmp}/batch"), 2,
         "--prompts cannot be combined with PROMPT", setup="prompts_txt"),
    # -- prompt embeddings ------------------------------------------------------------------------------------
    Case("embeds-missing", "--prompt-embeds names a missing file",
         ("generate", "--prompt-embeds", "{tmp}/e.safetensors", "--model", "{model}", "-o", "{out}"), 1,
         "does not exist"),
    Case("embeds-not-safetensors", "--prompt-embeds names a text file",
         ("generate", "--prompt-embeds", "{tmp}/e.safetensors", "--model", "{model}", "-o", "{out}"), 1,
         "is not a safetensors file", setup="text_as_embeds"),
    Case("embeds-other-family", "embeddings made for another family",
         ("generate", "--prompt-embeds", "{tmp}/e.safetensors", "--model", "{model}", "-o", "{out}", "--device",
          "cpu"), 1, "were made for flux", setup="flux_embeds"),
    Case("embeds-nan", "embeddings holding NaN",
         ("generate", "--prompt-embeds", "{tmp}/e.safetensors", "--model", "{model}", "-o", "{out}", "--device",
          "cpu", "--steps", "1", "--width", "32", "--height", "32"), 1, "hold NaN or infinite values",
         setup="nan_embeds"),
    Case("embeds-with-negative", "--negative with --prompt-embeds",
         ("generate", "--prompt-embeds", "{tmp}/e.safetensors", "--negative", "x", "--model", "{model}", "-o",
          "{out}"), 2, "--negative cannot change saved embeddings", setup="qwen_embeds"),
    Case("embeds-with-prompt", "a PROMPT and --prompt-embeds",
         ("generate", "a fox", "--prompt-embeds", "{tmp}/e.safetensors", "--model", "{model}", "-o", "{out}"), 2,
         "give either PROMPT or --prompt-embeds", setup="qwen_embeds"),
    # -- input images -----------------------------------------------------------------------------------------
    Case("init-missing", "--init-image names a missing file", _g("--init-image", "{tmp}/none.png"), 1,
         "does not exist"),
    Case("init-not-image", "--init-image names a text file", _g("--init-image", "{tmp}/note.png"), 1,
         "is not a readable image", setup="text_as_image"),
    Case("init-truncated", "--init-image is a cut-short PNG", _g("--init-image", "{tmp}/cut.png"), 1,
         "is not a readable image", setup="truncated_image"),
    Case("init-too-large", "--init-image claims 20000x20000 pixels", _g("--init-image", "{tmp}/bomb.png"), 1,
         "over qimg's limit", setup="bomb_image"),
    # -- LoRA files -------------------------------------------------------------------------------------------
    Case("lora-missing", "--lora names a file that does not exist", _g("--lora", "{tmp}/none.safetensors"), 1,
         "LoRA file"),
    Case("lora-pickle", "--lora names a .ckpt pickle", _g("--lora", "{tmp}/style.ckpt"), 1, "safetensors",
         setup="pickle_lora"),
    Case("lora-not-safetensors", "--lora names a text file called .safetensors", _g("--lora", "{tmp}/l.safetensors"),
         1, "", setup="text_lora"),
    Case("lora-no-match", "a LoRA none of whose keys names a module of the model",
         _g("--lora", "{tmp}/l.safetensors"), 1, "matches the qwen-image transformer", setup="unmatched_lora"),
    Case("lora-flux", "a FLUX LoRA on a Qwen-Image model", _g("--lora", "{tmp}/l.safetensors"), 1,
         "is a FLUX LoRA", setup="flux_lora"),
    Case("lora-bad-shape", "a LoRA whose matrices do not fit the module", _g("--lora", "{tmp}/l.safetensors"), 1,
         "transformer_blocks.0.attn.to_q", setup="misshapen_lora"),
    Case("lora-lycoris-tucker", "a LyCORIS LoHa/LoKr with Tucker cores, which are made for conv layers",
         _g("--lora", "{tmp}/l.safetensors"), 1, "is a LyCORIS Tucker (conv) file", setup="tucker_lora"),
    Case("lora-not-downloaded", "--lora names a hub file (OWNER/REPO/FILE) that is in no cache",
         _g("--lora", "lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.0.safetensors"), 1,
         "is not a local file"),
    Case("lora-bad-scale", "--lora PATH:inf", _g("--lora", "{tmp}/l.safetensors:inf"), 2,
         "the scale must be a finite number"),
    # -- downloads (no network: the suite runs with HF_HUB_OFFLINE=1 and empty caches) --------------------------
    Case("download-lora-name-as-repo", "a LoRA's --lora name (OWNER/REPO/FILE) given to download as the repo",
         ("download", "lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.0.safetensors"), 2,
         "names a file, not a repo"),
    Case("download-lora-offline", "download --file with HF_HUB_OFFLINE set and the file not in the cache",
         ("download", "lightx2v/Qwen-Image-Lightning", "--file", "*8steps*"), 1, "HF_HUB_OFFLINE is set"),
    # -- train-lora (nothing is created before the data and the settings check out) ----------------------------
    Case("train-no-caption", "an image of the training folder has no .txt caption", _t(), 1, "caption",
         setup="train_no_caption"),
    Case("train-bad-targets", "--targets names no target set", _t("--targets", "everything"), 2,
         "unknown --targets"),
    Case("train-edit-no-controls", "train-lora on an edit model with a dataset that has no control images",
         _t("--model", "{edit}"), 1, "has no control/ folder", setup="train_data"),
    Case("train-resume-nothing", "--resume in a folder that holds no run", _t("--resume"), 2,
         "holds no training state", setup="train_data"),
    Case("train-shard-alone", "--shard-base in one process (it shards over the processes of a torchrun job)",
         _t("--shard-base"), 2, "this is one process", setup="train_data"),
    # -- replay and info --------------------------------------------------------------------------------------
    Case("from-no-params", "--from a PNG that qimg did not write", ("generate", "--from", "{tmp}/in.png", "-o",
         "{out}"), 1, "carries no qimg parameters", setup="input_image"),
    Case("from-missing", "--from a file that does not exist", ("generate", "--from", "{tmp}/none.png", "-o",
         "{out}"), 1, "does not exist"),
    Case("info-not-png", "qimg info on a text file", ("info", "{tmp}/note.png"), 1, "", setup="text_as_image"),
    # -- interrupts -------------------------------------------------------------------------------------------
    Case("interrupt-single", "Ctrl-C while a single image loads", _g(), 130, "interrupted", setup="interrupt"),
    Case("interrupt-batch", "Ctrl-C during a batch",
         ("generate", "--prompts", "{tmp}/p.txt", "--model", "{model}", "-o", "{tmp}/batch", "--device", "cpu"),
         130, "interrupted", setup="interrupt_batch"),
)


def markdown() -> str:
    """docs/errors.md: the catalogue as a table, in the order of CASES."""
    lines = [
        "# What qimg says when something is wrong",
        "",
        "Every case below is a test (`tests/bad_inputs/test_catalogue.py`). Each one checks the exit code, that",
        "the first line of stderr says what is wrong, that there is no traceback, and that no file was created or",
        "changed. This page is written from that table (`python -m tests.bad_inputs.catalogue`), and CI checks",
        "that it is current.",
        "",
        "Exit codes: 0 done; 1 a qimg error (one line, then a hint); 2 the command line is wrong; 130",
        "interrupted (Ctrl-C or SIGTERM). `--debug` or `QIMG_DEBUG=1` adds the traceback.",
        "",
        "| case | what is wrong | command | exit | the first line says |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        command = " ".join(a.replace("\n", "\\n") if len(a) < 60 else a[:20] + "…" + a[-8:] for a in case.argv)
        first = f"`{case.first}`" if case.first else "(a one-line error)"
        lines.append(f"| `{case.id}` | {case.what} | `qimg {command}` | {EXIT_NAMES[case.code]} | {first} |")
    return "\n".join(lines) + "\n"


DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"

if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if DOC.is_file() and DOC.read_text() == markdown() else 1)
    DOC.write_text(markdown())
    print(f"wrote {DOC} ({len(CASES)} cases)")
