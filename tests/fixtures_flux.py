"""Offline FLUX.1 text-side fixtures: the CLIP-L and T5 tokenizers rebuilt in code (no hub, no sentencepiece) and
tiny random CLIPTextModel / T5EncoderModel, shared by the FLUX tests.

The tokenizer folders have the released files' layout: tokenizer/ holds vocab.json, merges.txt,
tokenizer_config.json and special_tokens_map.json as FLUX.1-dev ships them (openai/clip-vit-large-patch14's, no
tokenizer.json); tokenizer_2/ holds the tokenizer.json and tokenizer_config.json of a T5 tokenizer.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
from pathlib import Path

import torch

from tests.fixtures import randomize_

# A small English text the tokenizers learn their pieces from, so that real prompt words become multi-character
# tokens (and words outside it split into pieces, as rare words do with the real vocabularies).
CORPUS = """
A photograph of a red fox sitting in the snow at sunset, golden light, soft shadows, shallow depth of field.
A watercolor painting of a quiet harbor with small boats, blue water and white houses on the hills behind.
An astronaut riding a horse on the moon, cinematic lighting, highly detailed, sharp focus, wide angle lens.
A cozy kitchen in the morning with fresh bread on a wooden table, a cup of coffee and flowers by the window.
A portrait of an old man with a grey beard and a warm smile, studio lighting, black and white photograph.
A futuristic city at night with neon signs, rain on the street, people walking under colorful umbrellas.
A mountain lake surrounded by pine trees and tall peaks covered in snow, clear sky, reflections in the water.
A cat sleeping on a stack of books next to a green plant, soft afternoon light through the curtains.
A bowl of ramen with an egg, green onions and slices of pork, steam rising, top view, food photography.
A sign that says hello world in bold letters, painted on a brick wall, street art, bright colors.
A small robot holding a flower in a field of tall grass, digital art, pastel colors, gentle light.
A sailing ship in a storm with huge waves and dark clouds, oil painting, dramatic light from the sky.
Two children playing with a dog in the garden on a summer day, bright and happy, film photograph.
A dragon flying over a medieval castle with towers and flags, fantasy illustration, epic scene.
A close up of a butterfly on a purple flower, macro photograph, detailed wings, blurred green background.
The text on the poster reads the quick brown fox jumps over the lazy dog in large white letters.
"""

# ---------------------------------------------------------------------------------------------------------------
# CLIP-L: byte-level BPE with "</w>" word ends, as openai/clip-vit-large-patch14's vocab.json / merges.txt

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MERGES = 400
# CLIP's pre-tokenizer regex (transformers' CLIPTokenizer) for ASCII text: contractions, letter runs, single digits,
# runs of other symbols.
_CLIP_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def learn_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """The n most frequent pair merges over the text's words (CLIP's BPE training: the last symbol of a word
    carries "</w>"); ties break on the pair itself, so the result is deterministic."""
    byte_char = bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in _CLIP_WORDS.findall(text.lower()):
        chars = [byte_char[b] for b in word.encode()]
        words[(*chars[:-1], chars[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab.json's token -> id, merges.txt's pairs) of build_clip_tokenizer."""
    merges = learn_bpe(CORPUS, CLIP_MERGES)
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(c + "</w>" for c in base), *("".join(m) for m in merges), CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def _clip_special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
            "special": True}


def build_clip_tokenizer(out_dir: str | Path) -> Path:
    """A CLIP-L tokenizer folder: 256 byte characters, the same with "</w>", the learned merges, then
    <|startoftext|> and <|endoftext|> as the last two ids (as in CLIP-L's 49,408: the end token has the highest id,
    which CLIPTextModel's legacy pooling relies on). Pads with <|endoftext|>, model_max_length 77."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[CLIP_BOS]): _clip_special(CLIP_BOS),
                                 str(vocab[CLIP_EOS]): _clip_special(CLIP_EOS)},
        "bos_token": CLIP_BOS, "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": CLIP_EOS,
        "errors": "replace", "model_max_length": 77, "pad_token": CLIP_EOS, "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": _clip_special(CLIP_BOS), "eos_token": _clip_special(CLIP_EOS), "pad_token": CLIP_EOS,
               "unk_token": _clip_special(CLIP_EOS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------------
# T5: a Unigram model (<pad>=0, </s>=1, <unk>=2, then pieces, then 100 sentinels), Metaspace, "</s>" appended

T5_EXTRA_IDS = 100


def t5_pieces(text: str) -> dict[str, float]:
    """Unigram pieces and log-probability scores: the text's words with the word-start mark, frequent 2-4 letter
    pieces, and every ASCII letter, digit and common symbol so that any English word has a segmentation."""
    words = collections.Counter(re.findall(r"[A-Za-z]+", text))
    total = sum(words.values())
    grams: collections.Counter[str] = collections.Counter()
    for word, count in words.items():
        for n in (2, 3, 4):
            for i in range(len(word) - n + 1):
                grams[word[i : i + n]] += count
    pieces = {"▁" + w: math.log(c / total) for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))}
    for gram, count in sorted(grams.items(), key=lambda gc: (-gc[1], gc[0]))[:300]:
        pieces.setdefault(gram, math.log(count / total) - 2.0)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\"/":
        pieces.setdefault(ch, -12.0)
        pieces.setdefault("▁" + ch, -12.5)
    return pieces


def build_t5_tokenizer(out_dir: str | Path) -> Path:
    """A T5 tokenizer folder (tokenizer.json + tokenizer_config.json, model_max_length 512) built with the
    `tokenizers` library. Characters outside the vocabulary (CJK, emoji) become <unk>, as most do with T5's."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    extra = [f"<extra_id_{i}>" for i in reversed(range(T5_EXTRA_IDS))]  # T5 keeps the sentinels last, reversed
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0), *t5_pieces(CORPUS).items(),
             *((e, 0.0) for e in extra)]
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])  # fmt: skip
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>",
                                                                                       *extra)])
    tok = T5TokenizerFast(tokenizer_object=backend, model_max_length=512, extra_ids=T5_EXTRA_IDS)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tiny encoders: CLIP-L and T5-v1.1-XXL's configs shrunk (the released ones: CLIP hidden 768, 12 layers; T5 d_model
# 4096, 24 layers, gated-gelu). CLIP's hidden size is the pooled width (the FLUX transformer's
# pooled_projection_dim); T5's d_model its joint_attention_dim.

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)  # eos 2: CLIP-L's legacy value (argmax pooling)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
               layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
               use_cache=False)


def tiny_clip_text_model(seed: int = 0, vocab_size: int | None = None):
    """transformers' CLIPTextModel, tiny, every parameter random; vocab: build_clip_tokenizer's size."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size or len(clip_vocab()[0]), **TINY_CLIP)
    torch.manual_seed(seed)
    return randomize_(CLIPTextModel(config).eval(), seed)


def tiny_t5_encoder(seed: int = 0, vocab_size: int | None = None):
    """transformers' T5EncoderModel, tiny, every parameter random; vocab: build_t5_tokenizer's size."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size or t5_vocab_size(), **TINY_T5)
    torch.manual_seed(seed)
    return randomize_(T5EncoderModel(config).eval(), seed)


def t5_vocab_size() -> int:
    """build_t5_tokenizer's vocabulary size, without writing it."""
    return 4 + len(t5_pieces(CORPUS)) + T5_EXTRA_IDS


def write_flux_text_side(root: str | Path, *, seed: int = 0) -> Path:
    """A model folder's tokenizer/, tokenizer_2/, text_encoder/ (CLIP) and text_encoder_2/ (T5), as FLUX.1 ships
    them (the encoders saved by transformers' save_pretrained, safetensors)."""
    root = Path(root)
    build_clip_tokenizer(root / "tokenizer")
    build_t5_tokenizer(root / "tokenizer_2")
    tiny_clip_text_model(seed).save_pretrained(root / "text_encoder")
    tiny_t5_encoder(seed + 1).save_pretrained(root / "text_encoder_2")
    return root
