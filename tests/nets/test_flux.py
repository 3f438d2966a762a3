"""The FLUX.1 transformer against diffusers' FluxTransformer2DModel on the same tiny random weights (CPU)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qimg.errors import CheckpointError, ConfigError
from qimg.loading.flux import flux_linears, flux_params, load_flux
from qimg.nets.flux import FluxTransformer, SingleBlock, flux_ids, flux_rope
from qimg.specs import FluxParams
from tests.fixtures import randomize_

diffusers = pytest.importorskip("diffusers")

TINY_FLUX = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
TXT_LEN = 7

# Both sides run the same kernels in the same order (our RoPE's complex multiply is, on the CPU, the same two
# products and one add per channel as diffusers' real form), so fp32 and bf16 outputs came out bit-identical here
# (max abs difference 0). The bounds leave room for another CPU's kernel choices only:
# fp32: 1e-6 relative. bf16: 1e-2 relative (a bf16 ulp is 4e-3), while scaling t by 1000 in fp32 instead of bf16,
# the mistake that test is there for, moves the output by ~20%.
RTOL_FP32 = 1e-6
RTOL_BF16 = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """guidance_embeds -> (diffusers model, folder it saved, ours loaded from it): dev-style and schnell-style."""
    out = {}
    for guidance in (True, False):
        ref = randomize_(diffusers.FluxTransformer2DModel(**TINY_FLUX, guidance_embeds=guidance).eval(), 7)
        folder = tmp_path_factory.mktemp(f"flux-{guidance}")
        ref.save_pretrained(folder)
        out[guidance] = (ref, folder, load_flux(folder, device="cpu", dtype=torch.float32))
    return out


def _inputs(grids, batch=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n_img = sum(h * w for _, h, w in grids)
    x = torch.randn(batch, n_img, 64, generator=gen)
    txt = torch.randn(batch, TXT_LEN, TINY_FLUX["joint_attention_dim"], generator=gen)
    pooled = torch.randn(batch, TINY_FLUX["pooled_projection_dim"], generator=gen)
    # 0.989701 is facts 1.7's example: 1000 t rounds to 988 in bf16, so the place of the x1000 shows in bf16.
    t = torch.tensor([0.989701, 0.3721])[:batch]
    return x.to(dtype), txt.to(dtype), pooled.to(dtype), t.to(dtype)


def _run(ref, ours, grids, guidance, dtype=torch.float32):
    x, txt, pooled, t = _inputs(grids, dtype=dtype)
    g = torch.tensor([3.5, 2.0]) if guidance else None  # the pipeline passes fp32 guidance; the model casts it
    ids = flux_ids(TXT_LEN, grids)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                   img_ids=ids[TXT_LEN:], txt_ids=ids[:TXT_LEN], guidance=g, return_dict=False)[0]
        got = ours(x, txt, t, g, pooled, flux_rope(ids, TINY_FLUX["axes_dims_rope"]))
    assert got.shape == want.shape == x.shape
    return got, want


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("grids", [[(0, 3, 5)], [(0, 3, 5), (1, 4, 2)]], ids=["t2i", "kontext"])
def test_forward_matches_diffusers(models, guidance, grids):
    """Text-to-image, and Kontext (target tokens, then reference tokens at axis-0 id 1): every token compared."""
    ref, _, ours = models[guidance]
    got, want = _run(ref, ours, grids, guidance)
    assert _rel(got, want) < RTOL_FP32
    assert (got - want).abs().max() <= RTOL_FP32 * want.abs().max()


@pytest.mark.parity
def test_bf16_forward_matches_diffusers(models):
    ref, folder, _ = models[True]
    ours = load_flux(folder, device="cpu", dtype=torch.bfloat16)
    got, want = _run(copy.deepcopy(ref).to(torch.bfloat16), ours, [(0, 3, 5), (1, 2, 2)], True, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < RTOL_BF16


def test_rope_table_matches_flux_pos_embed():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes = (16, 56, 56)
    ids = flux_ids(11, [(0, 64, 48), (1, 40, 32)])  # a 1024x768 target and a Kontext reference
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)  # (S, 128) each, every value twice
    table = flux_rope(ids, axes)
    assert table.shape == (11 + 64 * 48 + 40 * 32, 64) and table.dtype == torch.complex64
    for half in (0, 1):  # both copies of each pair's cos and sin, exactly
        assert torch.equal(table.real, cos[:, half::2]) and torch.equal(table.imag, sin[:, half::2])


def test_ids_put_text_at_zero_and_images_on_uncentred_grids():
    ids = flux_ids(2, [(0, 2, 3), (1, 1, 2)])
    assert ids.dtype == torch.float32 and ids.shape == (2 + 6 + 2, 3)
    assert ids[:2].eq(0).all()
    assert ids[2:8].tolist() == [[0, r, c] for r in range(2) for c in range(3)]
    assert ids[8:].tolist() == [[1, 0, 0], [1, 0, 1]]  # the Kontext reference: axis 0 is 1


def test_sharded_folder_loads_the_same_weights(models, tmp_path):
    ref, _, ours = models[True]
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = load_flux(tmp_path, device="cpu", dtype=torch.float32).state_dict()
    want = ref.state_dict()
    assert sharded.keys() == want.keys() == ours.state_dict().keys()
    assert all(torch.equal(sharded[k], want[k]) for k in want)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())


def _edited(folder, tmp_path, edit):
    out = shutil.copytree(folder, tmp_path / "m")
    path = out / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("single_transformer_blocks.1.attn.norm_k.weight"),
         r"1 missing \(single_transformer_blocks\.1\.attn\.norm_k\.weight\)"),
        (lambda s: s.__setitem__("transformer_blocks.0.attn.to_out.1.weight", torch.zeros(2)),
         r"1 unexpected \(transformer_blocks\.0\.attn\.to_out\.1\.weight\)"),
        (lambda s: s.__setitem__("time_text_embed.guidance_embedder.linear_1.bias", torch.zeros(3)),
         r"wrong shape \(time_text_embed\.guidance_embedder\.linear_1\.bias \(3,\) != \(32,\)\)"),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_loading_is_strict(models, tmp_path, edit, message):
    folder = _edited(models[True][1], tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_flux(folder, device="cpu", dtype=torch.float32)
    assert "\n" not in str(e.value)


def test_dev_weights_do_not_load_into_a_schnell_config(models, tmp_path):
    folder = shutil.copytree(models[True][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    with pytest.raises(CheckpointError, match=r"4 unexpected \(time_text_embed\.guidance_embedder\."):
        load_flux(folder, device="cpu", dtype=torch.float32)


def _config(tmp_path, **changes):
    config = {"_class_name": "FluxTransformer2DModel", "in_channels": 64, **TINY_FLUX, **changes}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return tmp_path


def test_config_defaults_follow_diffusers(tmp_path):
    params = flux_params(_config(tmp_path, axes_dims_rope=..., out_channels=None, attention_head_dim=128))
    assert params.guidance_embeds is False  # absent: diffusers' class default, not FLUX.1-dev's
    assert params.axes_dims_rope == (16, 56, 56) and params.out_channels is None and params.patch_size == 1
    assert params.dim == 2 * 128


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(patch_size=2), "patch_size 2"),
        (dict(use_fancy_thing=True), "keys qimg does not know: use_fancy_thing"),
        (dict(num_single_layers=...), "lacks num_single_layers"),
        (dict(axes_dims_rope=[4, 6, 4]), "summing to attention_head_dim 16"),
    ],
    ids=["patch-size", "unknown-key", "missing-key", "rope-axes"],
)
def test_unsupported_configs_are_refused_in_one_line(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as e:
        flux_params(_config(tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_guidance_must_match_the_model(models):
    x, txt, pooled, t = _inputs([(0, 2, 2)])
    rope = flux_rope(flux_ids(TXT_LEN, [(0, 2, 2)]), TINY_FLUX["axes_dims_rope"])
    with pytest.raises(ValueError, match="needs a guidance value"):
        models[True][2](x, txt, t, None, pooled, rope)
    with pytest.raises(ValueError, match="takes no guidance value"):
        models[False][2](x, txt, t, torch.ones(2), pooled, rope)


def test_linears_match_the_loaded_net(models):
    for _, folder, ours in models.values():
        want = {n: (m.out_features, m.in_features) for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
        assert flux_linears(folder) == want


def test_released_dev_shapes():
    """flux_linears(None) and a meta build are FLUX.1-dev: facts 6.1's key count, parameter count and shapes."""
    linears = flux_linears(None)
    assert len(linears) == 10 + 19 * 14 + 38 * 6
    assert linears["single_transformer_blocks.37.proj_out"] == (3072, 15360)
    assert linears["transformer_blocks.18.norm1.linear"] == (18432, 3072)
    assert linears["time_text_embed.text_embedder.linear_1"] == (3072, 768)
    with torch.device("meta"):
        state = FluxTransformer(FluxParams()).state_dict()
    assert len(state) == 20 + 19 * 32 + 38 * 14
    assert sum(t.numel() for t in state.values()) == 11_901_408_320


def test_the_attention_kernel_gets_a_contiguous_output_gradient_in_training():
    """A single block slices the attention output (cat with the MLP branch), so its gradient arrives strided;
    cuDNN's attention backward fails on that on the GPU, so the call site hands kernels a contiguous one."""
    from qimg.nets import layers

    strides: list[bool] = []

    def recording(q, k, v, mask):
        out = layers.sdpa(q, k, v, mask)
        out.register_hook(lambda g: strides.append(g.is_contiguous()))
        return out

    previous = layers.set_attention_impl(recording)
    try:
        block = SingleBlock(32, 16)
        x = torch.randn(1, 6, 32, requires_grad=True)
        rope = flux_rope(flux_ids(2, [(0, 2, 2)]), (4, 6, 6), 10000.0)
        block(x, torch.randn(1, 32), rope).sum().backward()
    finally:
        layers.set_attention_impl(previous)
    assert strides == [True] and x.grad is not None
