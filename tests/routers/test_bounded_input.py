"""Bounded text before any model work: a prompt of any length is cut by characters before a
tokenizer reads it, on every path that tokenizes (the backbone's prefill, its length probe,
the text encoder's ``tokenize``), and the cut changes no token id the model reads."""

from __future__ import annotations

import random

import pytest

from extproc import ScorerError
from routers.backbone import BackboneConfig, TruncatedBackbone, tokenize
from routers.truncation import Truncation
from tests.routers.test_probe_support import WORDS, data_url, tiny_text_model, tiny_vl_model, tokenizer

MIB = 1 << 20


class TokenizerSpy:
    """A tokenizer that records the length of every text it is asked to tokenize."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def __call__(self, text=None, *args, **kwargs):
        self.lengths += [len(t) for t in ([text] if isinstance(text, str) else text)]
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def words(n_chars: int, seed: int) -> str:
    """``n_chars`` characters of random words (a 64 KiB block repeated, to build fast)."""
    rng = random.Random(seed)
    block = " ".join(rng.choice(WORDS) for _ in range(min(n_chars, 1 << 16) // 2))
    return (block * (n_chars // len(block) + 1))[:n_chars]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return TruncatedBackbone(BackboneConfig(str(tiny_text_model(tmp_path_factory.mktemp("bounded"))), layer=1))


@pytest.fixture()
def spy(backbone):
    real = backbone.tokenizer
    backbone.tokenizer = TokenizerSpy(real)
    yield backbone.tokenizer
    backbone.tokenizer = real


def full_cut_ids(backbone, messages) -> list[int]:
    """What the token cut alone keeps: the whole prompt tokenized, then cut (the old path)."""
    tok = backbone.tokenizer.inner if isinstance(backbone.tokenizer, TokenizerSpy) else backbone.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return backbone.truncation.apply(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def long_prompt(middle_chars: int) -> list[dict]:
    """A system turn, then a user turn of ``middle_chars`` characters whose start and end are
    the same whatever its length."""
    head, tail = "first words " + words(3000, 1), words(12000, 2) + " last words zebra"
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": head + words(middle_chars, 3) + tail},
    ]


def test_a_1mib_prompt_is_cut_by_characters_before_tokenizing_and_keeps_the_same_ids(backbone, spy):
    messages = long_prompt(MIB)
    expected = full_cut_ids(backbone, messages)
    assert len(expected) == backbone.truncation.max_tokens == 512
    spy.lengths.clear()
    ids = backbone.encode([messages])["input_ids"][0].tolist()
    assert ids == expected
    assert spy.lengths and max(spy.lengths) <= backbone.truncation.max_chars < 10_000
    assert backbone.token_lengths([messages]) == [512]
    assert max(spy.lengths) <= backbone.truncation.max_chars


def test_a_10mib_prompt_costs_what_a_prompt_at_the_limit_costs(backbone, spy):
    """Same start and end as the 1 MiB prompt: the same ids, the same characters tokenized."""
    small = backbone.encode([long_prompt(MIB)])["input_ids"]
    spy.lengths.clear()
    large = backbone.encode([long_prompt(10 * MIB)])["input_ids"]
    assert large.tolist() == small.tolist()
    assert spy.lengths and max(spy.lengths) <= backbone.truncation.max_chars


def test_many_long_messages_are_cut_as_one_prompt(backbone, spy):
    """Every message is cut before the chat template joins them: the template never renders
    megabytes, and the result is what cutting the joined prompt's tokens gives."""
    messages = [{"role": "user" if i % 2 else "assistant", "content": words(30_000, i)} for i in range(12)]
    spy.lengths.clear()
    ids = backbone.encode([messages])["input_ids"][0].tolist()
    assert ids == full_cut_ids(backbone, messages)
    assert max(spy.lengths) <= backbone.truncation.max_chars


ODD = ["\u0085", "\U0001f600", "e\u0301", "\u200d", "\r\n", "\U00010348"]


@pytest.mark.parametrize("shift", range(6))
def test_odd_unicode_at_the_cut_boundary_breaks_nothing(backbone, spy, shift):
    """NEL (U+0085), astral characters, combining marks and joiners right where the text is
    cut: nothing raises, and the ids are the ones the token cut alone keeps."""
    unit = "".join(ODD) + " word "
    text = "x" * shift + unit * (4 * backbone.truncation.max_chars // len(unit))
    messages = [{"role": "user", "content": text}]
    ids = backbone.encode([messages])["input_ids"][0].tolist()
    assert ids == full_cut_ids(backbone, messages)
    assert max(spy.lengths) <= backbone.truncation.max_chars


def test_the_text_encoders_tokenize_cuts_by_characters_first():
    """LatentRouter's `text` encoder tokenizes through `tokenize`: a BERT-style cut keeps
    [CLS] and [SEP] and reads a bounded text."""
    tok = tokenizer()
    spy = TokenizerSpy(tok)
    cut = Truncation(64)
    text = words(MIB, 7)
    batch = tokenize(spy, [text, "short"], cut)
    assert max(spy.lengths) <= cut.max_chars
    expected = cut.apply(tok(cut.cut_text(text), verbose=False)["input_ids"])
    assert batch["input_ids"][0].tolist() == expected
    assert expected[0] == tok.cls_token_id and expected[-1] == tok.sep_token_id
    reference = cut.apply(tok(text[:20_000] + text[-20_000:], verbose=False)["input_ids"])
    assert expected == reference  # the character cut changes no kept token


def test_the_hashing_encoder_reads_a_bounded_text():
    from routers.latent.encoders import EncoderSpec, HashingEncoder

    encoder = HashingEncoder(EncoderSpec(kind="hashing", dim=64))
    text = words(4 * MIB, 8)
    cut = Truncation()
    head, tail = cut.char_budget
    assert encoder._vector(text).tolist() == encoder._vector(text[:head] + text[-tail:]).tolist()


def test_a_prompt_with_images_over_the_budget_is_refused_before_tokenizing(tmp_path):
    """A prompt with images is never cut (the image tokens must stay whole): over the
    character budget it is refused without the processor or tokenizer running."""
    vl = TruncatedBackbone(BackboneConfig(str(tiny_vl_model(tmp_path)), layer=1))
    spy = TokenizerSpy(vl.processor.tokenizer)
    vl.processor.tokenizer = spy
    image = {"type": "image_url", "image_url": {"url": data_url((9, 9, 9))}}
    long = [{"role": "user", "content": [image, {"type": "text", "text": words(MIB, 9)}]}]
    with pytest.raises(ScorerError, match="prompts with images are never cut"):
        vl.encode([long])
    assert spy.lengths == []
    short = [{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}]
    assert "pixel_values" in vl.encode([short])
