"""The input side of Qwen-Image-Edit / -2509 / -2511: templates, sizes, vision tokens, prompt parity, model layouts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qimg.errors import ConfigError, ModelNotFoundError
from qimg.loading.components import load_image_processor, load_text_encoder, load_tokenizer, qwen_mmdit_params
from qimg.loading.hub import QWEN_IMAGE_EDIT_COMPONENTS, resolve_model
from qimg.nets.text_encoders import (
    IMAGE_PAD,
    QWEN_IMAGE_EDIT,
    QWEN_IMAGE_EDIT_PLUS,
    TEMPLATES,
    encode_qwen_prompt_with_images,
    expand_image_pads,
    format_prompt,
    mrope_position_ids,
    prepare_vl_inputs,
    vision_inputs,
)
from qimg.request import calculate_dimensions
from qimg.specs import ALIASES, SPEC_BY_PIPELINE_CLASS, SPECS
from tests.fixtures_edit import QWEN_VL_PREPROCESSOR, forwarding_mm_token_type_ids, reference_processor

PROMPTS = {
    "english": "Change the sky to a purple sunset and add a small red kite",
    "chinese": "把天空换成紫色的日落，并加一只红色的小风筝",
}
VISION_IDS = set(range(151652, 151657))  # <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (a gradient plus noise), deterministic per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def vl_resize(image: Image.Image, area: int) -> Image.Image:
    """The pipelines' first resize: LANCZOS to calculate_dimensions(area, aspect); the processor's follows."""
    return image.resize(calculate_dimensions(area, image.width / image.height), Image.LANCZOS)


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def image_processor(tiny_qwen_edit_pipe_and_dir):
    return load_image_processor(tiny_qwen_edit_pipe_and_dir[1] / "processor")


@pytest.fixture(scope="module")
def encoder(tiny_qwen_edit_pipe_and_dir):
    return load_text_encoder(tiny_qwen_edit_pipe_and_dir[1] / "text_encoder", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def plus_encoder(tiny_qwen_edit_2509_pipe_and_dir):
    folder = tiny_qwen_edit_2509_pipe_and_dir[1]
    encoder = load_text_encoder(folder / "text_encoder", device="cpu", dtype=torch.float32)
    return encoder, load_image_processor(folder / "processor")


# --- templates and sizes ----------------------------------------------------------------------------------------


def test_templates_are_diffusers_byte_for_byte(tiny_qwen_edit_pipe_and_dir, tiny_qwen_edit_2509_pipe_and_dir,
                                               tokenizer):
    edit, plus = tiny_qwen_edit_pipe_and_dir[0], tiny_qwen_edit_2509_pipe_and_dir[0]
    assert QWEN_IMAGE_EDIT.text == edit.prompt_template_encode
    assert QWEN_IMAGE_EDIT_PLUS.text == plus.prompt_template_encode
    assert QWEN_IMAGE_EDIT.drop == edit.prompt_template_encode_start_idx == 64
    assert QWEN_IMAGE_EDIT_PLUS.drop == plus.prompt_template_encode_start_idx == 64
    # The dropped part is exactly the system block and "<|im_start|>user\n".
    head = QWEN_IMAGE_EDIT_PLUS.text.split("{}")[0]
    assert head.endswith("<|im_start|>user\n") and len(tokenizer(head).input_ids) == 64
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert format_prompt(QWEN_IMAGE_EDIT_PLUS, "hi", 2) == QWEN_IMAGE_EDIT_PLUS.text.format(
        f"Picture 1: {vision}Picture 2: {vision}hi"
    )
    assert format_prompt(QWEN_IMAGE_EDIT_PLUS, "hi", 0) == QWEN_IMAGE_EDIT_PLUS.text.format("hi")
    assert format_prompt(QWEN_IMAGE_EDIT, "hi", 1) == QWEN_IMAGE_EDIT.text.format("hi")


@pytest.mark.parametrize(
    "area,ratio,size",
    [
        (1024 * 1024, 1.0, (1024, 1024)),
        (1024 * 1024, 4 / 3, (1184, 896)),
        (1024 * 1024, 3 / 4, (896, 1184)),
        (1024 * 1024, 16 / 9, (1376, 768)),
        (384 * 384, 1.0, (384, 384)),
        (384 * 384, 4 / 3, (448, 320)),
        (384 * 384, 16 / 9, (512, 288)),
    ],
)
def test_calculate_dimensions_examples(area, ratio, size):
    assert calculate_dimensions(area, ratio) == size


def test_calculate_dimensions_matches_both_diffusers_pipelines():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for w in range(64, 3000, 37):
        for h in (64, 100, 333, 768, 1024, 2047):
            for area in (384 * 384, 1024 * 1024):
                want = plus.calculate_dimensions(area, w / h)
                assert calculate_dimensions(area, w / h) == want == edit.calculate_dimensions(area, w / h)[:2]


# --- vision tokens ----------------------------------------------------------------------------------------------


def test_pad_expansion_count(image_processor):
    pixels, grid = vision_inputs([photo(120, 80, 0)], image_processor)
    assert grid.tolist() == [[1, 6, 8]] and tuple(pixels.shape) == (48, 1176)
    text = expand_image_pads(f"a{IMAGE_PAD}b", grid, image_processor.merge_size)
    assert text == "a" + IMAGE_PAD * 12 + "b"
    with pytest.raises(ValueError, match="placeholders"):
        expand_image_pads(f"{IMAGE_PAD}{IMAGE_PAD}", grid, 2)


@pytest.mark.parametrize(
    "size,area,tokens",
    [
        ((1600, 1200), 1024 * 1024, 1344),  # Edit: 1184x896, then smart_resize -> 1176x896 -> 42x32 merged tokens
        ((1000, 1000), 1024 * 1024, 1369),  # 1024x1024 -> 1036x1036 -> 37x37
        ((640, 480), 384 * 384, 176),  # Edit-Plus: 448x320 -> 448x308 -> 16x11
        ((500, 500), 384 * 384, 196),  # 384x384 -> 392x392 -> 14x14
    ],
)
def test_vision_token_counts_at_pipeline_sizes(image_processor, size, area, tokens):
    image = vl_resize(photo(*size, seed=1), area)
    inputs = vision_inputs([image], image_processor)
    t, h, w = inputs[1][0].tolist()
    assert t * h * w // image_processor.merge_size**2 == tokens


@pytest.mark.parametrize("template,count", [(QWEN_IMAGE_EDIT, 1), (QWEN_IMAGE_EDIT_PLUS, 2)], ids=["edit", "plus"])
def test_inputs_match_qwen2vl_processor(tokenizer, image_processor, template, count):
    """ids, mask, pixels and grids equal transformers' own Qwen2VLProcessor output, and the drop keeps the vision."""
    images = [vl_resize(photo(640, 480, 2), 384 * 384), vl_resize(photo(360, 640, 3), 384 * 384)][:count]
    text = format_prompt(template, PROMPTS["chinese"], count)
    got = prepare_vl_inputs(tokenizer, image_processor, text, images)
    want = reference_processor(tokenizer)(text=[text], images=images, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(got[key], want[key]), key
    ids = got["input_ids"][0].tolist()
    assert not VISION_IDS & set(ids[: template.drop])  # the drop never reaches into the vision tokens
    kept = tokenizer.decode(ids[template.drop :])
    assert kept.startswith("<|vision_start|>" if template is QWEN_IMAGE_EDIT else "Picture 1: <|vision_start|>")
    pads = ids.count(151655)
    assert pads == sum(t * h * w // 4 for t, h, w in got["image_grid_thw"].tolist())


def test_position_ids_match_transformers_rope_index(encoder, tokenizer, image_processor):
    images = [vl_resize(photo(640, 480, 4), 384 * 384), vl_resize(photo(300, 500, 5), 384 * 384)]
    inputs = prepare_vl_inputs(tokenizer, image_processor, format_prompt(QWEN_IMAGE_EDIT_PLUS, "x", 2), images)
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    want, _ = encoder.model.get_rope_index(
        ids, mm_token_type_ids=(ids == 151655).long(), image_grid_thw=grid, attention_mask=inputs["attention_mask"]
    )
    config = encoder.config
    got = mrope_position_ids(ids[0], grid, config.image_token_id, config.vision_config.spatial_merge_size)
    assert torch.equal(got, want)
    assert torch.equal(mrope_position_ids(ids[0, :64], None, 151655, 2), torch.arange(64).expand(3, 1, -1))


# --- prompt embeddings vs diffusers -----------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("which,area", [("english", 1024 * 1024), ("chinese", 384 * 384)])
def test_edit_embeddings_match_diffusers(tiny_qwen_edit_pipe_and_dir, encoder, tokenizer, image_processor, which,
                                         area):
    ref, _ = tiny_qwen_edit_pipe_and_dir
    image = vl_resize(photo(900, 600, 6), area)  # the Edit pipeline feeds the VL encoder its ~1 MP copy
    got, got_mask = encode_qwen_prompt_with_images(
        encoder, tokenizer, image_processor, PROMPTS[which], [image], QWEN_IMAGE_EDIT
    )
    with torch.no_grad(), forwarding_mm_token_type_ids(ref.text_encoder):
        want, want_mask = ref._get_qwen_prompt_embeds(PROMPTS[which], image, device="cpu")
    assert got.shape == want.shape
    # At 1 MP: 1248x832, resized again to 1260x840 -> 1350 vision tokens, all kept.
    assert got.shape[1] > (1350 if area > 384 * 384 else 176)
    # Same weights, same tokens and positions, same transformers code: equal up to fp32 summation order.
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(got_mask, want_mask)


@pytest.mark.parity
@pytest.mark.parametrize("which", sorted(PROMPTS))
def test_edit_plus_embeddings_match_diffusers(tiny_qwen_edit_2509_pipe_and_dir, plus_encoder, tokenizer, which):
    ref, folder = tiny_qwen_edit_2509_pipe_and_dir
    encoder, image_processor = plus_encoder
    images = [vl_resize(photo(640, 480, 7), 384 * 384), vl_resize(photo(360, 640, 8), 384 * 384)]
    got, got_mask = encode_qwen_prompt_with_images(
        encoder, tokenizer, image_processor, PROMPTS[which], images, QWEN_IMAGE_EDIT_PLUS
    )
    with torch.no_grad(), forwarding_mm_token_type_ids(ref.text_encoder):
        want, want_mask = ref._get_qwen_prompt_embeds(PROMPTS[which], images, device="cpu")
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(got_mask, want_mask)


@pytest.mark.parity
def test_diffusers_on_transformers5_loses_the_vision_positions(tiny_qwen_edit_pipe_and_dir, encoder, tokenizer,
                                                               image_processor):
    """Documents diffusers issue #14194: without mm_token_type_ids the vision tokens get 1-D positions."""
    ref, _ = tiny_qwen_edit_pipe_and_dir
    image = vl_resize(photo(400, 400, 9), 384 * 384)
    got, _ = encode_qwen_prompt_with_images(encoder, tokenizer, image_processor, "x", [image], QWEN_IMAGE_EDIT)
    with torch.no_grad():
        shipped, _ = ref._get_qwen_prompt_embeds("x", image, device="cpu")
    assert got.shape == shipped.shape
    # Token 0 (<|vision_start|>) sits at position 64 either way; the vision tokens after it do not.
    assert (got[0, 0] - shipped[0, 0]).abs().max().item() < 1e-5
    assert (got[0, 1:] - shipped[0, 1:]).abs().max().item() > 1e-3


def test_encoder_refuses_a_placeholder_count_mismatch(encoder, tokenizer, image_processor):
    image = photo(56, 56, 0)
    with pytest.raises(ValueError, match="placeholders"):
        encode_qwen_prompt_with_images(encoder, tokenizer, image_processor, "x", [image, image], QWEN_IMAGE_EDIT)
    with pytest.raises(ValueError, match="no image"):
        encode_qwen_prompt_with_images(encoder, tokenizer, image_processor, "x", [], QWEN_IMAGE_EDIT)


# --- specs, layouts, loaders ------------------------------------------------------------------------------------


def test_edit_specs():
    for name, repo, cls in [
        ("qwen-image-edit", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline"),
        ("qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline"),
        ("qwen-image-edit-2511", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline"),
    ]:
        spec = SPECS[name]
        assert (spec.pipeline_class, spec.family, spec.repos["hf"], ALIASES[repo]) == (cls, "qwen-image", repo, name)
        assert (spec.task, spec.steps, spec.cfg, spec.negative) == ("edit", 50, 4.0, " ")
    assert SPEC_BY_PIPELINE_CLASS["QwenImageEditPipeline"] == "qwen-image-edit"
    assert SPEC_BY_PIPELINE_CLASS["QwenImageEditPlusPipeline"] == "qwen-image-edit-2509"
    assert (SPECS["qwen-image-edit"].max_images, SPECS["qwen-image-edit-2511"].max_images) == (1, None)
    assert SPECS["qwen-image-edit-2509"].vl_image_area == 384 * 384
    assert SPECS["qwen-image"].task == "t2i"
    for spec in SPECS.values():  # Qwen models name a template of the Qwen encoder; FLUX.1 wraps prompts in none
        qwen = spec.family == "qwen-image"
        assert spec.prompt_template in TEMPLATES if qwen else spec.prompt_template == "flux-clip-t5"


@pytest.mark.parametrize(
    "variant,spec,zero_cond_t",
    [("edit", "qwen-image-edit", False), ("edit-2509", "qwen-image-edit-2509", False),
     ("edit-2511", "qwen-image-edit-2511", True)],
)
def test_resolve_edit_layouts(tiny_edit_model, variant, spec, zero_cond_t):
    _, folder = tiny_edit_model(variant)
    ref = resolve_model(folder)
    assert ref.spec.name == spec
    # 2509 and 2511 share a pipeline class; what tells them apart is the transformer's config, read by the loader.
    assert qwen_mmdit_params(folder / "transformer").zero_cond_t is zero_cond_t
    assert json.loads((folder / "model_index.json").read_text())["processor"] == ["transformers", "Qwen2VLProcessor"]


def _fake_model(root, class_name, components):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    for component, marker in components.items():
        (root / component).mkdir()
        (root / component / marker).write_text("{}")
    return root


def test_resolve_refuses_an_edit_model_without_processor(tmp_path):
    components = {k: v for k, v in QWEN_IMAGE_EDIT_COMPONENTS.items() if k != "processor"}
    folder = _fake_model(tmp_path / "m", "QwenImageEditPlusPipeline", components)
    with pytest.raises(ModelNotFoundError, match=r"missing its processor/ component \(processor/preprocessor_config"):
        resolve_model(folder)
    # A text-to-image model needs no processor/.
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    assert resolve_model(folder).spec.name == "qwen-image"


def test_variant_comes_from_model_index_not_the_path(tmp_path):
    misnamed = _fake_model(tmp_path / "Qwen-Image-Edit-2511", "QwenImageEditPipeline", QWEN_IMAGE_EDIT_COMPONENTS)
    assert resolve_model(misnamed).spec.name == "qwen-image-edit"
    other = _fake_model(tmp_path / "qwen-image", "QwenImageEditPlusPipeline", QWEN_IMAGE_EDIT_COMPONENTS)
    assert resolve_model(other).spec.name == "qwen-image-edit-2509"


def test_load_image_processor(tmp_path, tiny_qwen_edit_pipe_and_dir):
    processor = load_image_processor(tiny_qwen_edit_pipe_and_dir[1] / "processor")
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"  # no torchvision needed
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 12845056)
    assert list(processor.image_mean) == QWEN_VL_PREPROCESSOR["image_mean"]
    for name, error in [("Qwen2VLImageProcessorFast", None), ("CLIPImageProcessor", "not a Qwen2-VL"),
                        ("NoSuchImageProcessor", "does not have")]:
        folder = tmp_path / name
        shutil.copytree(tiny_qwen_edit_pipe_and_dir[1] / "processor", folder)
        config = {**QWEN_VL_PREPROCESSOR, "image_processor_type": name}
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
        if error is None:
            assert type(load_image_processor(folder)).__name__ == "Qwen2VLImageProcessorPil"
        else:
            with pytest.raises(ConfigError, match=error):
                load_image_processor(folder)
