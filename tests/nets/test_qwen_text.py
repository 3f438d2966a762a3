"""qimg's Qwen2.5 language model (text-only prompts): its settings from either config layout; parity with
transformers is in tests/loading/test_text_encoder_loading.py and tests/test_pipelines.py."""

from __future__ import annotations

import pytest
import torch

from qimg.nets.qwen_text import QwenTextParams, rope_cos_sin

# The released Qwen-Image text_encoder/config.json's language-model keys (an older transformers: top level,
# rope_scaling), and the same model as transformers 5 writes it (text_config, rope_parameters).
OLD = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
       "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 152064,
       "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
       "vision_config": {"depth": 32}}
NEW = {"text_config": {**{k: v for k, v in OLD.items() if k not in ("rope_theta", "rope_scaling", "vision_config")},
                       "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0,
                                           "rope_type": "default", "type": "mrope"}},
       "vision_config": {"depth": 32}}


def test_both_config_layouts_give_the_same_settings() -> None:
    want = QwenTextParams(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                          rope_theta=1e6)
    assert QwenTextParams.from_config(OLD) == QwenTextParams.from_config(NEW) == want


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0}])
def test_rope_scaling_it_does_not_compute_is_refused(scaling: dict) -> None:
    with pytest.raises(ValueError, match="unsupported RoPE"):
        QwenTextParams.from_config({**OLD, "rope_scaling": scaling})


def test_rope_tables_rotate_half_pairs_at_one_frequency() -> None:
    """Position p, frequency i: cos(p / theta^(2i/d)) in both halves (transformers' rotate-half layout)."""
    cos, sin = rope_cos_sin(5, 8, 10000.0, torch.device("cpu"), torch.float32)
    freq = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.arange(5).float()[:, None] * freq
    torch.testing.assert_close(cos, torch.cat([angles.cos()] * 2, dim=-1))
    torch.testing.assert_close(sin, torch.cat([angles.sin()] * 2, dim=-1))
