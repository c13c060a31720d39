"""IncrementalDetokenizer: deltas concatenate to the one-shot decode, and never show a premature U+FFFD."""

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

NAMES = ["v1", "v3", "tekken"]
TEXTS = [
    "Hello, world! This is plain ASCII.",
    "你好，世界！饕餮",                       # Chinese, rare characters included
    "🦙 llama 🚀 rocket 👍🏽",                 # emoji (v1: byte-fallback pieces), one with a skin-tone modifier
    "naïve café — über Ελληνικά",           # accented Latin, Greek
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 mixed 中文 and ASCII",       # 4-byte characters
]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_bundled(name) for name in NAMES}


def byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of the 256 single-byte tokens: sentencepiece byte-fallback pieces or tekken's first ranks."""
    if tok._anchor_id is None:  # tekken: bytes are the first 256 ranks after the special tokens
        return [tok._inner.num_special_tokens + b for b in range(256)]
    return [tok._inner.get_special_token(f"<0x{b:02X}>") for b in range(256)]


def run(tok: Tokenizer, ids: list[int], prompt: list[int], **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    return [detok.add(i) for i in ids] + [detok.flush()], detok


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizers, name, text):
    tok = tokenizers[name]
    prompt = tok.encode_chat([{"role": "user", "content": "Say something."}])
    ids = tok.encode(text, add_bos=False)
    deltas, detok = run(tok, ids, prompt)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert deltas[-1] == ""  # nothing was left held back
    assert not any("\ufffd" in d for d in deltas)


def test_byte_fallback_pieces_are_held_until_the_character_completes(tokenizers):
    tok = tokenizers["v1"]
    ids = tok.encode("🦙", add_bos=False)  # ▁ <0xF0> <0x9F> <0xA6> <0x99>
    deltas, _ = run(tok, ids, [tok.bos_id])
    assert deltas == ["", "", "", "", "🦙", ""]


def test_tekken_byte_tokens_are_held_until_the_character_completes(tokenizers):
    tok = tokenizers["tekken"]
    ids = [byte_ids(tok)[b] for b in "中a".encode()]
    deltas, _ = run(tok, ids, [tok.bos_id])
    assert deltas == ["", "", "中", "a", ""]


@pytest.mark.parametrize("name", ["v1", "tekken"])
def test_flush_releases_an_unfinished_character_as_replacement(tokenizers, name):
    tok = tokenizers[name]
    ids = [byte_ids(tok)[b] for b in "中".encode()[:2]]
    deltas, detok = run(tok, ids, [tok.bos_id])
    assert deltas[:2] == ["", ""] and deltas[2] == tok.decode(ids) and "\ufffd" in deltas[2]
    assert detok.text == tok.decode(ids)


@pytest.mark.parametrize("name", ["v1", "tekken"])
def test_a_control_token_ends_a_held_character(tokenizers, name):
    """Both decoders restart UTF-8 decoding after a control token, so the cut bytes can never complete."""
    tok = tokenizers[name]
    ids = [byte_ids(tok)[0xE4], tok.eos_id, *(byte_ids(tok)[b] for b in "中".encode())]
    deltas, _ = run(tok, ids, [tok.bos_id])
    assert deltas[0] == "" and deltas[1] == tok.decode(ids[:1]) and deltas[-2] == "中"
    assert "".join(deltas) == tok.decode(ids)


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_the_first_generated_space_follows_the_prompt(tokenizers, name):
    tok = tokenizers[name]
    paris = tok.encode("Paris", add_bos=False)  # ▁Paris
    completion_prompt = tok.encode("The capital of France is")
    assert run(tok, paris, completion_prompt)[1].text == " Paris"
    assert run(tok, paris, [tok.bos_id])[1].text == "Paris"  # a new sequence: the ▁ is the dummy prefix
    assert run(tok, paris, completion_prompt, continues_prompt=False)[1].text == "Paris"


@pytest.mark.parametrize("name", ["v1", "v3"])  # v1 ends the turn with the text "[/INST]", v3 with a control
def test_a_chat_answer_has_no_leading_space(tokenizers, name):
    tok = tokenizers[name]
    prompt = tok.encode_chat([{"role": "user", "content": "Capital of France?"}])
    assert run(tok, tok.encode("Paris", add_bos=False), prompt)[1].text == "Paris"


@pytest.mark.parametrize("name", NAMES)
def test_random_ids_concatenate_to_the_full_decode(tokenizers, name):
    """Seeded fuzz: uniform ids, runs of raw bytes (most of them invalid UTF-8) and control tokens."""
    tok = tokenizers[name]
    rng = random.Random(1234)
    raw_bytes = byte_ids(tok)
    controls = [i for i in range(64) if tok.is_special(i)][:16]
    for _ in range(300):
        byte_heavy = rng.random() < 0.4
        ids = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            pool = raw_bytes if (r < 0.85 if byte_heavy else r < 0.3) else controls if r > 0.95 else None
            ids.append(rng.choice(pool) if pool else rng.randrange(tok.vocab_size))
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 3))]
        deltas, detok = run(tok, ids, prompt)
        full = tok.decode(ids, continues_text=tok.output_continues_prompt(prompt))
        assert "".join(deltas) == detok.text == full, (ids, prompt)
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", NAMES)
def test_random_text_never_shows_a_replacement_character(tokenizers, name):
    tok = tokenizers[name]
    rng = random.Random(99)
    alphabet = "ab ,.\n" + "éüñ" + "你好饕餮" + "🦙🚀👍🏽" + "𝔘𝔫" + "Ελλ"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text, add_bos=False)
        deltas, _ = run(tok, ids, [tok.bos_id])
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas), text


class _CountingTokenizer(Tokenizer):
    """Records how many ids each decode call is given."""

    def __init__(self, inner: Tokenizer):
        super().__init__(inner._mistral)
        self.window_sizes: list[int] = []

    def decode(self, token_ids, *, continues_text=False):
        self.window_sizes.append(len(token_ids))
        return super().decode(token_ids, continues_text=continues_text)


@pytest.mark.parametrize("name", ["v1", "tekken"])
def test_cost_per_token_is_bounded_even_for_garbage_bytes(tokenizers, name):
    """A long stream of invalid UTF-8 keeps every decode to a few ids: no re-decode of the whole output."""
    tok = _CountingTokenizer(tokenizers[name])
    rng = random.Random(7)
    ids = [rng.choice(byte_ids(tok)) for _ in range(2000)]
    deltas, detok = run(tok, ids, [tok.bos_id])
    assert "".join(deltas) == detok.text == tokenizers[name].decode(ids)
    assert max(tok.window_sizes) <= 8
    assert len(tok.window_sizes) <= 3 * len(ids) + 1
