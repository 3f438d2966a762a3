"""text_encoder/ loading: safetensors only (a pickle is refused before anything reads it) and strict about keys."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qimg.errors import CheckpointError
from qimg.loading.components import load_text_encoder
from tests.fixtures import tiny_text_encoder

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """The tiny Qwen2.5-VL of tests/fixtures.py saved by transformers' own save_pretrained (safetensors)."""
    model = tiny_text_encoder(seed=0)
    folder = tmp_path_factory.mktemp("saved") / "text_encoder"
    model.save_pretrained(folder)
    return folder, model


def _configs_only(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for config in src.glob("*.json"):
        shutil.copy(config, dst / config.name)
    return dst


def test_safetensors_weights_load(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, model = saved
    loaded = load_text_encoder(folder, device="cpu", dtype=torch.float32)
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pickled_weights_are_refused_unread(saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _configs_only(saved[0], tmp_path / "text_encoder")
    torch.save(saved[1].state_dict(), folder / "pytorch_model.bin")  # a real, loadable pickle of the same weights
    unpickled = []

    def spy(*args, **kwargs):
        unpickled.append(args)
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(pickle, "load", spy)
    with pytest.raises(CheckpointError, match="never unpickles") as info:
        load_text_encoder(folder, device="cpu", dtype=torch.float32)
    assert str(folder) in str(info.value) and "pytorch_model.bin" in str(info.value)
    assert "\n" not in str(info.value) and "safetensors" in (info.value.hint or "")
    assert unpickled == []


def test_an_unexpected_tensor_is_an_error(saved, tmp_path: Path) -> None:
    folder = _configs_only(saved[0], tmp_path / "text_encoder")
    state = load_file(str(saved[0] / WEIGHTS))
    key = "model.layers.0.mlp.extra.weight"
    state[key] = torch.zeros(2)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    refused = r"^text_encoder/ weights .*match the network: 1 unexpected \("
    for vision in (True, False):  # transformers' network and qimg's language model alike
        with pytest.raises(CheckpointError, match=refused) as info:
            load_text_encoder(folder, device="cpu", dtype=torch.float32, vision=vision, head=False)
        assert "extra.weight" in str(info.value)


def test_a_missing_tensor_is_an_error_but_lm_head_is_not(saved, tmp_path: Path) -> None:
    """lm_head is never used to encode prompts, so a file without it still loads; any other gap is an error."""
    state = load_file(str(saved[0] / WEIGHTS))
    no_head = _configs_only(saved[0], tmp_path / "a" / "text_encoder")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(no_head / WEIGHTS),
              metadata={"format": "pt"})
    load_text_encoder(no_head, device="cpu", dtype=torch.float32)

    gap = _configs_only(saved[0], tmp_path / "b" / "text_encoder")
    save_file({k: v for k, v in state.items() if ".layers.1.mlp.down_proj." not in k}, str(gap / WEIGHTS),
              metadata={"format": "pt"})
    for vision in (True, False):
        with pytest.raises(CheckpointError, match="1 missing") as info:
            load_text_encoder(gap, device="cpu", dtype=torch.float32, vision=vision, head=False)
        assert "layers.1.mlp.down_proj.weight" in str(info.value)


def test_a_tokenizer_is_read_once_per_unchanged_folder(qwen_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Reading the Qwen2 tokenizer costs ~1.6 s of CPU: a process reads an unchanged folder once; a changed file
    (another size or time) is read, and checked, again."""
    from qimg.errors import ConfigError
    from qimg.loading.components import load_tokenizer

    folder = Path(shutil.copytree(qwen_tokenizer_dir, tmp_path / "tokenizer"))
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first
    assert first("a red fox")["input_ids"] == load_tokenizer(qwen_tokenizer_dir)("a red fox")["input_ids"]
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer_config.json is not readable JSON"):
        load_tokenizer(folder)


def test_layer_by_layer_loading_equals_from_pretrained_and_reads_nothing_unused(saved, monkeypatch) -> None:
    """Host memory never holds the whole encoder: when layer i arrives the later ones are unread. The encoder
    built that way (its rotary tables rebuilt, since a meta build has none) computes what transformers'
    from_pretrained computes; without the vision tower and the LM head, neither is read."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import qimg.loading.qwen_text as qwen_text

    folder, _ = saved
    layers: list[torch.nn.Module] = []
    build = qwen_text.load_module

    def watched(make, *args, **kwargs):
        def made():
            model = make()
            inner = model.model
            layers.extend(getattr(inner, "language_model", inner).layers)
            return model
        return build(made, *args, **kwargs)

    monkeypatch.setattr(qwen_text, "load_module", watched)
    arrived: list[tuple[str, int, bool]] = []

    def on_layer(kind: str, i: int, module: torch.nn.Module) -> None:
        arrived.append((kind, i, all(p.is_meta for later in layers[i + 1:] for p in later.parameters())))

    want = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    ids = torch.tensor([[3, 17, 42, 5, 9, 151644, 8]])
    with torch.no_grad():
        ref = want(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    for vision in (True, False):  # transformers' network with its vision tower; qimg's language model alone
        layers.clear()
        arrived.clear()
        ours = load_text_encoder(folder, device="cpu", dtype=torch.float32, vision=vision, head=False,
                                 on_layer=on_layer)
        assert [a for a in arrived if a[0] == "layers"] == [("layers", i, True) for i in range(len(layers))]
        assert any(a[0] == "blocks" for a in arrived) == vision  # the vision tower is read only when asked for
        assert isinstance(ours.lm_head, torch.nn.Identity) and not any(b.is_meta for b in ours.buffers())
        with torch.no_grad():
            got = ours.model(input_ids=ids).last_hidden_state if vision else ours(ids)
        assert torch.equal(got, ref)
    assert ours.model.visual is None
    with_vision = load_text_encoder(folder, device="cpu", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(with_vision.buffers(), want.buffers(), strict=True))


def test_own_language_model_equals_transformers_in_bf16_and_imports_nothing_from_it(saved) -> None:
    """qimg's Qwen2.5 language model (text-only prompts) against transformers' on the same weights in bf16, and
    loading it in a fresh process imports neither transformers nor torch._dynamo."""
    import subprocess
    import sys

    from transformers import Qwen2_5_VLForConditionalGeneration

    folder, _ = saved
    ours = load_text_encoder(folder, device="cpu", dtype=torch.bfloat16, vision=False, head=False)
    want = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 151000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids)
        ref = want.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)  # the same roundings, op for op
    script = ("import sys, torch\nfrom qimg.loading.components import load_text_encoder\n"
              f"load_text_encoder(__import__('pathlib').Path({str(folder)!r}), device='cpu', dtype=torch.float32,"
              " vision=False, head=False)\nprint(sorted(m for m in sys.modules if m.startswith('transformers')),"
              " 'torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] False"  # nor torch._dynamo (1.5 s), which a meta-device init would pull in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_encoder_read_straight_into_the_gpu_equals_one_read_on_the_cpu(saved) -> None:
    """read_to="cuda" fills every tensor in GPU memory as it is read (no host copy) with the values a CPU read
    gives, and the encoder computes the same, with and without the vision tower."""
    folder, _ = saved
    ids = torch.tensor([[3, 17, 42, 5, 9, 151644, 8]])
    for vision in (True, False):
        on_gpu = load_text_encoder(folder, device=None, dtype=torch.float32, vision=vision, head=False,
                                   read_to="cuda")
        on_cpu = load_text_encoder(folder, device=None, dtype=torch.float32, vision=vision, head=False)
        params = dict(on_gpu.named_parameters())
        assert params and all(p.is_cuda for p in params.values())
        assert all(torch.equal(params[n].cpu(), p) for n, p in on_cpu.named_parameters())
        with torch.no_grad():
            run = (lambda m, x: m.model(input_ids=x).last_hidden_state) if vision else (lambda m, x: m(x))
            got, want = run(on_gpu.to("cuda"), ids.cuda()), run(on_cpu, ids)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)  # GPU vs CPU float32 kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [None, "weights"])
def test_the_pipeline_reads_a_resident_encoder_straight_into_the_gpu(saved, fp8, monkeypatch) -> None:
    """The pipeline's loader reads an encoder that stays on the GPU there (no host copy first), and the encoder
    computes what a CPU-loaded one does."""
    from qimg.loading import components
    from qimg.pipelines import prompts

    folder, _ = saved
    asked: list[torch.device] = []
    load = components.load_text_encoder

    def spy(*args, **kwargs):
        asked.append(torch.device(kwargs["read_to"]))
        return load(*args, **kwargs)

    monkeypatch.setattr(components, "load_text_encoder", spy)
    every = lambda name, linear: True  # noqa: E731
    on_gpu, _ = prompts.load_text_encoder(folder, torch.device("cuda"), torch.float32, fp8, None, "t2i", every)
    on_cpu, _ = prompts.load_text_encoder(folder, torch.device("cpu"), torch.float32, fp8, None, "t2i", every)
    assert [d.type for d in asked] == ["cuda", "cpu"]
    assert all(t.is_cuda for t in (*on_gpu.parameters(), *on_gpu.buffers()))
    ids = torch.tensor([[3, 17, 42, 5, 9, 151644, 8]])
    with torch.no_grad():
        got, want = on_gpu(ids.cuda()), on_cpu(ids)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)  # GPU vs CPU float32 kernels


PROMPTS = ["a red fox in the snow", "一只在雪地里的红狐狸, 4K", "emoji 🦊🌨️ and 'quotes' \"double\" $2 per cup",
           "<|im_start|>user\nspecial tokens inside<|im_end|>", "  leading and trailing spaces  ", "", "x" * 3000]


def test_the_tokenizer_file_gives_transformers_ids_and_names_a_broken_file(qwen_tokenizer_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Text-to-image prompts are tokenized by `tokenizers` alone: the same ids as transformers' Qwen2 tokenizer
    for the same text (scripts, emoji, the chat template's special tokens, spaces, an empty and a long prompt),
    read once per unchanged folder; a missing or broken tokenizer.json is one line naming it."""
    from qimg.errors import ConfigError, ModelNotFoundError
    from qimg.loading.components import load_tokenizer, load_tokenizer_file
    from qimg.nets.text_encoders import QWEN_IMAGE_T2I, prompt_tokens, token_ids

    ours, theirs = load_tokenizer_file(qwen_tokenizer_dir), load_tokenizer(qwen_tokenizer_dir)
    assert load_tokenizer_file(qwen_tokenizer_dir) is ours
    for prompt in PROMPTS:
        text = QWEN_IMAGE_T2I.text.format(prompt)
        assert token_ids(ours, text) == token_ids(theirs, text) == theirs([text]).input_ids[0]
        assert prompt_tokens(ours, prompt) == prompt_tokens(theirs, prompt)
    folder = Path(shutil.copytree(qwen_tokenizer_dir, tmp_path / "tokenizer"))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 12', encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer.json is not a readable tokenizer"):
        load_tokenizer_file(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer_file(folder)
