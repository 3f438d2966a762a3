"""Strict, loud loading of the official layout: single file, shards with an index, and every kind of mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qimg.errors import CheckpointError, ConfigError, ModelNotFoundError
from qimg.loading.components import load_qwen_mmdit, load_schedule
from qimg.loading.hub import resolve_model
from tests.fixtures import TINY_MMDIT, randomize_

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same tiny transformer saved as one file and as shards with an index."""
    ref = randomize_(diffusers.QwenImageTransformer2DModel(**TINY_MMDIT), 5)
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    ref.save_pretrained(single)
    ref.save_pretrained(sharded, max_shard_size="100KB")
    return ref, single, sharded


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_sharded_and_single_file_load_the_same_weights(saved):
    ref, single, sharded = saved
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    a = load_qwen_mmdit(single, device="cpu", dtype=torch.float32).state_dict()
    b = load_qwen_mmdit(sharded, device="cpu", dtype=torch.float32).state_dict()
    want = ref.state_dict()
    assert a.keys() == b.keys() == want.keys()
    assert all(torch.equal(a[k], want[k]) and torch.equal(b[k], want[k]) for k in want)


def test_dtype_is_applied_at_load(saved):
    model = load_qwen_mmdit(saved[1], device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def _edit_single(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_key_is_reported_by_name(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    _edit_single(folder, lambda s: s.pop("transformer_blocks.1.attn.to_q.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing \(transformer_blocks\.1\.attn\.to_q\.weight\)"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)


def test_unexpected_key_is_an_error(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    _edit_single(folder, lambda s: s.__setitem__("transformer_blocks.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected \(transformer_blocks\.0\.extra\.weight\)"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)


def test_wrong_shape_is_an_error(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    _edit_single(folder, lambda s: s.__setitem__("proj_out.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"wrong shape \(proj_out\.bias \(3,\) != \(64,\)\)"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)


def test_missing_shard_is_reported(saved, tmp_path):
    folder = _copy(saved[2], tmp_path / "m")
    next(folder.glob("*-00001-of-*.safetensors")).unlink()
    with pytest.raises(ModelNotFoundError, match="missing 1 shard"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)


def test_truncated_file_is_reported(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)


def test_unknown_config_key_and_unsupported_variant_are_errors(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_single_layers": 38}))
    with pytest.raises(ConfigError, match="num_single_layers"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)
    (folder / "config.json").write_text(json.dumps({**config, "use_layer3d_rope": True}))
    with pytest.raises(ConfigError, match="use_layer3d_rope"):
        load_qwen_mmdit(folder, device="cpu", dtype=torch.float32)


def test_scheduler_config_is_read_and_unsupported_options_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "max_shift": 0.9, "shift_terminal": 0.02,
         "use_dynamic_shifting": True, "use_karras_sigmas": False}))
    s = load_schedule(tmp_path)
    assert (s.max_shift, s.shift_terminal, s.use_dynamic_shifting) == (0.9, 0.02, True)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"use_karras_sigmas": True}))
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        load_schedule(tmp_path)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        resolve_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="StableDiffusionPipeline"):
        resolve_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ModelNotFoundError, match="missing its transformer/ component"):
        resolve_model(tmp_path)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
                                          for _ in range(3))
        self.register_buffer("table", torch.zeros(2))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)
        self.frozen = torch.nn.Linear(4, 2)
        self.frozen.requires_grad_(False)


def test_grouped_loads_assign_what_load_state_dict_would(tmp_path) -> None:
    """load_module assigns each group's tensors to their owners only (load_state_dict visits every module of the
    model for every group): the same values, Parameters with the same requires_grad, buffers as loaded; a model
    with load_state_dict hooks still goes through load_state_dict, and its hooks run."""
    from qimg.loading.checkpoint import load_module

    want = _Net()
    for p in want.parameters():
        torch.nn.init.normal_(p)
    want.table.fill_(3.0)
    save_file({k: v.contiguous() for k, v in want.state_dict().items()}, str(tmp_path / "w.safetensors"))

    def group(name: str) -> str | None:
        return ".".join(name.split(".")[:2]) if name.startswith("blocks.") else None

    got = load_module(_Net, [tmp_path / "w.safetensors"], device="cpu", group=group)
    assert set(got.state_dict()) == set(want.state_dict())
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    assert all(type(p) is torch.nn.Parameter for p in got.parameters())
    assert [p.requires_grad for p in got.parameters()] == [p.requires_grad for p in want.parameters()]
    assert got.scratch.is_meta  # non-persistent: not in the file, left as built (callers fill such buffers)

    seen: list[str] = []

    class Hooked(_Net):
        def __init__(self) -> None:
            super().__init__()
            self.blocks[1].register_load_state_dict_pre_hook(lambda module, sd, prefix, *args: seen.append(prefix))

    hooked = load_module(Hooked, [tmp_path / "w.safetensors"], device="cpu", group=group)
    assert "blocks.1." in seen
    assert all(torch.equal(hooked.state_dict()[k], v) for k, v in want.state_dict().items())


def test_meta_device_skips_random_init_only_on_meta_and_only_in_its_thread() -> None:
    """meta_device builds shapes without running random initialisation on meta tensors; a real tensor's random
    fill inside it, and another thread's build meanwhile, are untouched."""
    import threading

    from torch.overrides import TorchFunctionMode

    from qimg.loading.checkpoint import meta_device

    real = torch.nn.init.uniform_
    seen: dict[str, torch.Tensor] = {}
    inside, leave = threading.Event(), threading.Event()

    def other_thread() -> None:
        inside.wait()
        seen["linear"] = torch.nn.Linear(16, 16).weight.detach()  # built while the main thread is in meta_device
        leave.set()

    reached: list[str] = []  # the initialisation calls that got past meta_device, with is_meta

    class Below(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.uniform_ or getattr(func, "__module__", None) == "torch.nn.init":
                reached.append(f"{func.__name__} {(args[0] if args else kwargs['tensor']).is_meta}")
            return func(*args, **kwargs)

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        with Below(), meta_device():
            linear = torch.nn.Linear(8, 8)
            conv = torch.nn.Conv2d(3, 4, 3)
            filled = torch.zeros(64, device="cpu").uniform_(1.0, 2.0)
            inside.set()
            leave.wait(30)
    finally:
        inside.set()  # a failure above must not leave the worker waiting
        worker.join(30)
    assert reached == ["uniform_ False"]  # the meta weights' kaiming_uniform_ stopped; the real fill went through
    assert all(p.is_meta for p in (*linear.parameters(), *conv.parameters()))
    assert filled.min() >= 1.0 and filled.std() > 0  # a real tensor is still filled
    assert seen["linear"].device.type == "cpu" and seen["linear"].std() > 0  # the other thread: a normal build
    assert torch.nn.init.uniform_ is real  # a per-thread mode, not a patched torch.nn.init
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"  # nothing outlives the context


def test_a_tensor_read_at_an_unaligned_offset_gets_memory_of_its_own(tmp_path) -> None:
    """safetensors hands out views into the file at the offsets it stores them at; weights must not depend on
    that (a CPU matmul's result can depend on its operands' alignment)."""
    from safetensors import safe_open

    from qimg.loading.checkpoint import own_memory

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(3, 5), "b": torch.randn(7, 4)}, str(path))
    with safe_open(str(path), "pt") as handle:
        views = [handle.get_tensor("a"), handle.get_tensor("b"), handle.get_slice("b")[1:3]]
    assert any(v.data_ptr() % 64 for v in views)  # what this test is about: some are not aligned
    for view in views:
        owned = own_memory(view)
        assert owned.data_ptr() % 64 == 0 and torch.equal(owned, view)
        assert (owned is view) == (view.data_ptr() % 64 == 0)  # aligned ones are kept as they are
