"""FLUX.1 prompt encoding: the offline CLIP / T5 fixtures, parity of FluxPromptEncoder with diffusers'
FluxPipeline.encode_prompt on the same tiny encoders, the cut counts, the embeddings' provenance, FP8 and offload
placement of T5, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from qimg.embeddings import PromptEmbeds, load_embeddings, save_embeddings
from qimg.errors import CheckpointError, InputError, ModelNotFoundError
from qimg.families.qwen import QWEN_IMAGE
from qimg.loading.flux_text import load_t5_encoder
from qimg.loading.hub import ModelRef
from qimg.pipelines import flux_prompts
from qimg.pipelines.flux_prompts import FluxPromptEncoder, t5_fp8_layers
from qimg.request import make_request
from qimg.runtime.fp8 import FP8Linear, quantize_rowwise
from qimg.runtime.offload import Offloaded, Residency
from qimg.runtime.options import RuntimeOptions
from qimg.runtime.planner import MemoryPlan
from qimg.specs import ModelSpec
from tests.fixtures_flux import CLIP_BOS, CLIP_EOS, TINY_CLIP, TINY_T5, write_flux_text_side

CPU = torch.device("cpu")
SPEC = ModelSpec(name="flux-dev", family="flux", pipeline_class="FluxPipeline", steps=28, cfg=1.0, guidance=3.5)
# The FLUX family record as the encoder reads it (only text_encoder_fp8 is used); families/flux.py owns the real one.
FLUX = dataclasses.replace(QWEN_IMAGE, name="flux", text_encoder_fp8=t5_fp8_layers,
                           encode_prompt=flux_prompts.encode_prompt)
LONG = ("A photograph of a red fox sitting in the snow at sunset with golden light and soft shadows, a watercolor "
        "painting of a quiet harbor with small boats and blue water, an astronaut riding a horse on the moon with "
        "cinematic lighting, a cozy kitchen in the morning with fresh bread on a wooden table and a cup of coffee.")
PROMPTS = {
    "short": ("a red fox in the snow", 512),
    "over-77-clip-tokens": (LONG, 512),
    "over-max-sequence-length": (LONG, 24),
    "chinese-emoji": ("一只狐狸在雪中 🦊🎉, a fox in the snow", 512),
    "empty": ("", 512),
    "space": (" ", 77),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux_text_side(tmp_path_factory.mktemp("tiny-flux-text"), seed=5)


def _oracle(root: Path, dtype: torch.dtype):
    """diffusers' FluxPipeline with only its text side, each part loaded as its from_pretrained would."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return FluxPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype),
        tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def oracle(root: Path):
    return _oracle(root, torch.float32)


def _diffusers(oracle, prompt: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, pooled) as FluxPipeline.__call__ gets them: encode_prompt under its no_grad (with autograd on,
    CPU attention takes another kernel and the last bits differ)."""
    with torch.no_grad():
        embeds, pooled, _ = oracle.encode_prompt(prompt, device="cpu", max_sequence_length=length)
    return embeds, pooled


def _encoder(root: Path, dtype: torch.dtype = torch.float32, **kwargs) -> FluxPromptEncoder:
    return FluxPromptEncoder(ModelRef(root, SPEC, "tiny-flux"), FLUX, CPU, dtype, **kwargs)


@pytest.fixture(scope="module")
def encoder(root: Path) -> FluxPromptEncoder:
    return _encoder(root)


# -- the offline fixtures -------------------------------------------------------------------------------------------


def test_clip_tokenizer_is_laid_out_as_clip_l(root: Path):
    from transformers import AutoTokenizer, CLIPTokenizer

    assert sorted(p.name for p in (root / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
    n = len(tok)
    assert n > 512 + 300  # bytes, bytes + "</w>", a few hundred merges, two specials
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (CLIP_BOS, CLIP_EOS, CLIP_EOS)
    assert (tok.bos_token_id, tok.eos_token_id) == (n - 2, n - 1)  # end token last: CLIP-L's argmax pooling
    tokens = tok.convert_ids_to_tokens(tok("A Photograph of the snow").input_ids)
    assert tokens == [CLIP_BOS, "a</w>", "photograph</w>", "of</w>", "the</w>", "snow</w>", CLIP_EOS]
    padded = tok("a fox", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == n - 1
    assert len(set(tok("一只狐狸 🦊").input_ids)) > 3  # byte-level: no unknown token


def test_t5_tokenizer_is_laid_out_as_t5(root: Path):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = AutoTokenizer.from_pretrained(root / "tokenizer_2")
    assert isinstance(tok, T5TokenizerFast) and tok.model_max_length == 512
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    tokens = tok.convert_ids_to_tokens(tok("A photograph of the snow").input_ids)
    assert tokens == ["▁A", "▁photograph", "▁of", "▁the", "▁snow", "</s>"]
    assert tok.convert_ids_to_tokens(tok("一只狐狸").input_ids) == ["▁", "<unk>", "</s>"]
    assert tok.convert_ids_to_tokens(len(tok) - 1) == "<extra_id_0>"


def test_tiny_encoders_match_their_tokenizers(root: Path, encoder: FluxPromptEncoder):
    clip, t5 = encoder.model["text_encoder"], encoder.model["text_encoder_2"]
    assert clip.config.vocab_size == len(encoder.tokenizer) and t5.config.vocab_size == len(encoder.tokenizer_2)
    assert clip.config.hidden_size == TINY_CLIP["hidden_size"] and t5.config.d_model == TINY_T5["d_model"]
    assert all(p.abs().sum() > 0 for p in encoder.model.parameters())  # randomised: no zero-initialised layer


# -- parity with diffusers --------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", PROMPTS)
def test_encode_matches_diffusers(encoder: FluxPromptEncoder, oracle, name: str):
    prompt, length = PROMPTS[name]
    want_embeds, want_pooled = _diffusers(oracle, prompt, length)
    got = encoder.encode(prompt, length)
    assert got.mask is None
    assert got.embeds.shape == (1, length, TINY_T5["d_model"]) and got.pooled.shape == (1, TINY_CLIP["hidden_size"])
    assert torch.equal(got.embeds, want_embeds) and torch.equal(got.pooled, want_pooled)


@pytest.mark.parity
def test_encode_matches_diffusers_in_bfloat16(root: Path):
    oracle = _oracle(root, torch.bfloat16)
    encoder = _encoder(root, torch.bfloat16)
    for prompt, length in (PROMPTS["short"], PROMPTS["over-max-sequence-length"]):
        want_embeds, want_pooled = _diffusers(oracle, prompt, length)
        got = encoder.encode(prompt, length)
        assert got.embeds.dtype == got.pooled.dtype == torch.bfloat16
        assert torch.equal(got.embeds, want_embeds) and torch.equal(got.pooled, want_pooled)


def test_prompts_differ_and_padding_is_attended(encoder: FluxPromptEncoder):
    """Guards against parity of two wrong things: different prompts give different vectors, and T5's padded
    positions carry values (no mask zeroes them)."""
    a, b = encoder.encode("a red fox", 16), encoder.encode("a blue boat", 16)
    assert not torch.equal(a.pooled, b.pooled) and not torch.equal(a.embeds, b.embeds)
    assert bool((a.embeds[0, -1].abs() > 0).any())


# -- cut counts, provenance, refusals ---------------------------------------------------------------------------------


def test_dropped_tokens_count_each_cut(encoder: FluxPromptEncoder, oracle):
    clip_ids = oracle.tokenizer(LONG).input_ids  # untruncated, with <|startoftext|> and <|endoftext|>
    t5_ids = oracle.tokenizer_2(LONG).input_ids  # with </s>
    assert len(clip_ids) > 77
    request = make_request(SPEC, LONG, negative="a fox", max_sequence_length=24, seed=0)[0]
    assert encoder.dropped_tokens(request, with_negative=True) == {
        "prompt": len(t5_ids) - 24, "prompt_clip": len(clip_ids) - 77}
    # What the cut keeps is what diffusers feeds: the first 23 tokens and </s>.
    kept = oracle.tokenizer_2(LONG, padding="max_length", max_length=24, truncation=True).input_ids
    assert kept == t5_ids[:23] + [1]
    request = make_request(SPEC, "a fox", negative=LONG, max_sequence_length=512, seed=0)[0]
    assert encoder.dropped_tokens(request, with_negative=True) == {"negative_clip": len(clip_ids) - 77}
    assert encoder.dropped_tokens(request, with_negative=False) == {}


def test_encode_request_records_provenance(encoder: FluxPromptEncoder, tmp_path: Path):
    request = make_request(SPEC, LONG, negative="blurry", max_sequence_length=24, seed=0)[0]
    data = encoder.encode_request(request, with_negative=True)
    assert torch.equal(data.cond.embeds, encoder.encode(LONG, 24).embeds)
    assert torch.equal(data.uncond.pooled, encoder.encode("blurry", 24).pooled)
    meta = data.meta
    assert {k: meta[k] for k in ("family", "template", "model", "prompt", "negative", "max_sequence_length",
                                 "dtype")} == {
        "family": "flux", "template": "flux-clip-t5", "model": "tiny-flux", "prompt": LONG, "negative": "blurry",
        "max_sequence_length": 24, "dtype": "float32"}  # fmt: skip
    assert meta["text_encoder"].count("#") == 1 and meta["text_encoder_2"].count("#") == 1
    assert meta["text_encoder"] != meta["text_encoder_2"] and meta["qimg_version"]
    assert meta["dropped_tokens"]["prompt"] > 0 and meta["dropped_tokens"]["prompt_clip"] > 0
    # A saved file keeps the pooled vectors and reads back as this model's embeddings.
    back = load_embeddings(save_embeddings(tmp_path / "fox.safetensors", data))
    assert torch.equal(back.cond.pooled, data.cond.pooled) and torch.equal(back.uncond.embeds, data.uncond.embeds)
    assert {k: back.meta[k] for k in ("text_encoder_2", "dropped_tokens")} == {
        k: meta[k] for k in ("text_encoder_2", "dropped_tokens")}
    encoder.check_embeddings(back)
    without = encoder.encode_request(request, with_negative=False)
    assert without.uncond is None and without.meta["negative"] is None


def test_check_embeddings_refuses_other_recipes(encoder: FluxPromptEncoder):
    request = make_request(SPEC, "a fox", negative=" ", max_sequence_length=16, seed=0)[0]
    data = encoder.encode_request(request, with_negative=False)
    qwen = dataclasses.replace(data, meta={**data.meta, "family": "qwen-image", "template": "qwen-image-t2i"})
    with pytest.raises(InputError, match=r"made for qwen-image \(qwen-image-t2i\), not for flux"):
        encoder.check_embeddings(qwen)
    unpooled = dataclasses.replace(data, cond=PromptEmbeds(data.cond.embeds))
    with pytest.raises(InputError, match="pooled CLIP vector"):
        encoder.check_embeddings(unpooled)


def test_longer_than_512_tokens_is_refused(encoder: FluxPromptEncoder):
    with pytest.raises(InputError, match="at most 512 prompt tokens"):
        encoder.encode("a fox", 513)
    # The request refuses it first, naming the family's bound (and the encoder would again).
    with pytest.raises(InputError, match="between 1 and 512") as refused:
        make_request(SPEC, "a fox", max_sequence_length=1024, seed=0)
    assert "at most 512" in (refused.value.hint or "")


def test_images_are_refused_for_text_to_image(encoder: FluxPromptEncoder):
    from PIL import Image

    with pytest.raises(InputError, match="takes no input images"):
        encoder.encode_request(make_request(SPEC, "a fox", seed=0)[0], images=[Image.new("RGB", (8, 8))])


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_2", "text_encoder"])
def test_a_folder_without_a_text_part_is_refused_in_one_line(root: Path, tmp_path: Path, missing: str):
    copy = tmp_path / "flux"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(missing))
    encoder = _encoder(copy)
    with pytest.raises(ModelNotFoundError) as info:
        encoder.load_tokenizers()
        encoder.encode("a fox", 16)
    message = str(info.value)
    assert f"has no {missing}/" in message and "\n" not in message and "FLUX.1" in message


def test_a_tokenizer_folder_without_its_vocabulary_is_refused(root: Path, tmp_path: Path):
    """transformers 5 would quietly build a 3-token CLIP (or 104-token T5) tokenizer from such a folder."""
    copy = tmp_path / "flux"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("vocab.json", "tokenizer.json"))
    with pytest.raises(ModelNotFoundError, match="has no vocab.json"):
        _ = _encoder(copy).tokenizer
    with pytest.raises(ModelNotFoundError, match="has no tokenizer.json"):
        _ = _encoder(copy).tokenizer_2


def test_encode_prompt_loads_only_the_text_side(root: Path):
    request = make_request(SPEC, "a fox", negative="blurry", max_sequence_length=16, seed=0)[0]
    data = flux_prompts.encode_prompt(ModelRef(root, SPEC, "tiny-flux"), RuntimeOptions(device="cpu"), request,
                                      family=FLUX)
    assert data.cond.embeds.shape == (1, 16, TINY_T5["d_model"]) and data.uncond.pooled is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- FP8 storage and placement -------------------------------------------------------------------------------------


def test_fp8_predicate_selects_t5_block_linears_only():
    assert t5_fp8_layers("encoder.block.3.layer.0.SelfAttention.q", None)
    assert t5_fp8_layers("encoder.block.23.layer.1.DenseReluDense.wo", None)
    assert t5_fp8_layers("encoder.block.0.layer.1.DenseReluDense.wi_1", None)
    for name in ("shared", "encoder.embed_tokens", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                 "encoder.block.0.layer.0.layer_norm", "encoder.final_layer_norm",
                 "text_model.encoder.layers.0.self_attn.q_proj", "encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert not t5_fp8_layers(name, None), name


def _rounded_to_e4m3(encoder: FluxPromptEncoder) -> FluxPromptEncoder:
    """The encoder with every T5 weight the predicate selects replaced, in place, by its e4m3 round trip in the
    weight's own dtype (what an FP8 linear multiplies with, its input cast as transformers casts it)."""
    with torch.no_grad():
        for name, m in encoder.model["text_encoder_2"].named_modules():
            if isinstance(m, torch.nn.Linear) and t5_fp8_layers(name, m):
                q, scale = quantize_rowwise(m.weight)
                m.weight.copy_(q.to(m.weight.dtype) * scale.to(m.weight.dtype))
    return encoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_weights_store_t5_linears_only(root: Path, encoder: FluxPromptEncoder, dtype: torch.dtype):
    """The FP8 T5 computes exactly what the e4m3-rounded weights give; CLIP is untouched. In float16 transformers
    keeps T5's wo in float32 and feeds it float32, and the FP8 wo keeps that contract."""
    fp8 = _encoder(root, dtype, fp8="weights")
    swapped = [n for n, m in fp8.model.named_modules() if isinstance(m, FP8Linear)]
    assert len(swapped) == TINY_T5["num_layers"] * 7 and all(n.startswith("text_encoder_2.encoder.block.")
                                                             for n in swapped)
    wo = fp8.model["text_encoder_2"].encoder.block[0].layer[1].DenseReluDense.wo
    wo_dtype = torch.float32 if dtype == torch.float16 else dtype  # transformers' _keep_in_fp32_modules
    assert wo.weight.dtype == wo.out_dtype == wo_dtype
    got = fp8.encode(LONG, 32)
    want = _rounded_to_e4m3(_encoder(root, dtype)).encode(LONG, 32)
    assert got.embeds.dtype == dtype and torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)
    full = encoder.encode(LONG, 32)
    # The tiny random T5 is touchier than the real one (attention logits unscaled, 32 wide): ~14% in L2 here.
    assert 0 < _rel(got.embeds.float(), full.embeds) < 0.3


@pytest.mark.parametrize("streamed", [(), (1,), (0, 1)])
def test_offloaded_and_streamed_t5_gives_the_resident_embeddings(root: Path, encoder: FluxPromptEncoder, streamed):
    """A layer plan as on a GPU, with the CPU standing in for the device (the planner never offloads on a CPU)."""
    phases = {"text": {"text_encoder"}, "denoise": {"transformer"}}
    plan = MemoryPlan("layer", None, "cuda", False, {"text_encoder": streamed}, phases)
    residency = Residency({}, phases)
    offloaded = _encoder(root, plan=plan, residency=residency)
    want = encoder.encode(LONG, 32)
    for _ in range(2):
        got = offloaded.encode(LONG, 32)
        assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)
        residency.enter("denoise")
    te = residency.components["text_encoder"]
    assert isinstance(te, Offloaded) and te.streamed == list(streamed) and not te.on_device
    offloaded.release()
    assert not offloaded.loaded and "text_encoder" not in residency.components


def test_release_frees_and_reloads(root: Path):
    enc = _encoder(root)
    first = enc.encode("a fox", 16)
    assert enc.loaded and enc.model_if_loaded is not None
    enc.release()
    assert not enc.loaded and enc.model_if_loaded is None
    assert torch.equal(enc.encode("a fox", 16).embeds, first.embeds)


# -- loading the encoders -----------------------------------------------------------------------------------------


def _text_encoder_2_copy(root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "text_encoder_2"
    folder.mkdir()
    shutil.copy(root / "text_encoder_2" / "config.json", folder / "config.json")
    return folder


def test_t5_pickles_are_refused_unread(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from safetensors.torch import load_file

    folder = _text_encoder_2_copy(root, tmp_path)
    torch.save(load_file(str(root / "text_encoder_2" / "model.safetensors")), folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(CheckpointError, match="never unpickles") as info:
        load_t5_encoder(folder, device="cpu", dtype=torch.float32)
    assert "pytorch_model.bin" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["unexpected", "missing", "shape"])
def test_t5_weights_must_match_the_network(root: Path, tmp_path: Path, damage: str):
    from safetensors.torch import load_file, save_file

    folder = _text_encoder_2_copy(root, tmp_path)
    state = load_file(str(root / "text_encoder_2" / "model.safetensors"))
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    if damage == "unexpected":
        state["encoder.extra.weight"] = torch.zeros(2)
    elif damage == "missing":
        del state[key]
    else:
        state[key] = torch.zeros(TINY_T5["d_model"], TINY_T5["d_ff"] + 1)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"^text_encoder_2/ weights does not match the network: 1 ") as info:
        load_t5_encoder(folder, device="cpu", dtype=torch.float32)
    assert ("extra.weight" if damage == "unexpected" else key) in str(info.value) and "\n" not in str(info.value)


def test_t5_loads_block_by_block_and_ties_its_embedding(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Host memory never holds the whole encoder: when block i arrives, the later blocks are not read yet. The
    result equals transformers' own from_pretrained, with encoder.embed_tokens tied to shared, whether the file
    stores the tied copy or not; in float16 the FFN output linears stay float32, as transformers keeps them."""
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    import qimg.loading.flux_text as flux_text

    blocks: list[torch.nn.Module] = []  # the meta-built model's blocks, watched while they load
    build = flux_text.load_module

    def watched(make, *args, **kwargs):
        def made():
            model = make()
            blocks.extend(model.encoder.block)
            return model
        return build(made, *args, **kwargs)

    arrived: list[tuple[int, bool]] = []

    def on_block(i: int, block: torch.nn.Module) -> None:
        arrived.append((i, all(p.is_meta for later in blocks[i + 1:] for p in later.parameters())))

    monkeypatch.setattr(flux_text, "load_module", watched)
    ours = load_t5_encoder(root / "text_encoder_2", device="cpu", dtype=torch.float32, on_block=on_block)
    assert arrived == [(i, True) for i in range(TINY_T5["num_layers"])]
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    want = T5EncoderModel.from_pretrained(root / "text_encoder_2").eval()
    ids = torch.tensor([[5, 9, 3, 1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, want(ids).last_hidden_state, rtol=0, atol=0)

    folder = _text_encoder_2_copy(root, tmp_path)  # a file that stores the tied copy too
    state = load_file(str(root / "text_encoder_2" / "model.safetensors"))
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    half = load_t5_encoder(folder, device="cpu", dtype=torch.float16)
    assert half.encoder.embed_tokens.weight is half.shared.weight
    assert {p.dtype for n, p in half.named_parameters() if n.endswith(".wo.weight")} == {torch.float32}
    assert half.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16


def test_loaded_encoders_hold_the_saved_weights(root: Path, encoder: FluxPromptEncoder):
    from safetensors.torch import load_file

    for name in ("text_encoder", "text_encoder_2"):
        saved = load_file(str(root / name / "model.safetensors"))
        got = encoder.model[name].state_dict()
        assert all(torch.equal(got[k], v) for k, v in saved.items())
