"""Tokenizer: bundled and on-disk loading, plain and chat encoding against mistral-common, typed errors."""

import pickle
import shutil
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine.errors import ChatTemplateError, InvalidRequestError
from engine.tokenizer import BUNDLED_TOKENIZERS, Tokenizer, TokenizerNotFoundError, UnknownTokenizerError

DATA = Path(mistral_common.__file__).parent / "data"
TEXTS = ["Hello, world!", "  two leading spaces", "naïve café — über", "你好，世界！", "🦙 llama 🚀",
         "a\nb\tc"]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_bundled(name) for name in ("v1", "v3", "v7", "tekken")}


@pytest.mark.parametrize("name, vocab_size, version", [
    ("v1", 32000, "v1"), ("v3", 32768, "v3"), ("v7", 32768, "v7"), ("tekken", 131072, "v3")])
def test_bundled_tokenizers_load(tokenizers, name, vocab_size, version):
    tok = tokenizers[name]
    assert (tok.vocab_size, tok.version, tok.bos_id, tok.eos_id) == (vocab_size, version, 1, 2)
    assert tok.is_special(tok.bos_id) and tok.is_special(tok.eos_id)


def test_bundled_v2_loads():
    assert Tokenizer.from_bundled("v2").version == "v2"


def test_unknown_bundled_name_lists_the_valid_ones():
    with pytest.raises(UnknownTokenizerError, match="v1, v2, v3, v7, tekken") as info:
        Tokenizer.from_bundled("v4")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["v1", "v3", "v7", "tekken"])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizers, name, text):
    tok = tokenizers[name]
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == tok._mistral.decode(ids)  # same as mistral-common's own decode
    # sentencepiece normalizes runs of spaces on encode; everything else comes back verbatim
    if not (name != "tekken" and text.startswith("  ")):
        assert tok.decode(ids) == text


def test_v1_sends_rare_characters_through_byte_pieces(tokenizers):
    """The detokenizer tests rely on this: v1 spells 🦙 as four byte-fallback pieces."""
    tok = tokenizers["v1"]
    pieces = [tok._inner.id_to_piece(i) for i in tok.encode("🦙", add_bos=False)]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_continues_text_keeps_the_sentencepiece_leading_space(tokenizers, name):
    tok = tokenizers[name]
    ids = tok.encode("Paris", add_bos=False)
    assert tok.decode(ids) == "Paris"
    assert tok.decode(ids, continues_text=True) == " Paris"
    prompt = tok.encode("The capital of France is", add_bos=False)
    assert tok.decode(prompt + ids) == tok.decode(prompt) + tok.decode(ids, continues_text=True)


def test_tekken_decodes_the_same_with_or_without_context(tokenizers):
    tok = tokenizers["tekken"]
    ids = tok.encode(" Paris", add_bos=False)
    assert tok.decode(ids) == tok.decode(ids, continues_text=True) == " Paris"


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_output_continues_a_completion_prompt_but_not_a_chat_turn(tokenizers, name):
    tok = tokenizers[name]
    assert tok.output_continues_prompt(tok.encode("The capital of France is"))
    assert not tok.output_continues_prompt(tok.encode_chat([{"role": "user", "content": "Hi"}]))
    assert not tok.output_continues_prompt([tok.bos_id])
    assert not tok.output_continues_prompt([])


def test_decode_skips_control_tokens(tokenizers):
    tok = tokenizers["v3"]
    assert tok.decode([tok.bos_id, *tok.encode("Hi", add_bos=False), tok.eos_id]) == "Hi"


def test_decode_refuses_ids_outside_the_vocabulary(tokenizers):
    tok = tokenizers["v1"]
    with pytest.raises(ValueError, match=r"32000 is outside this tokenizer's vocabulary \[0, 32000\)"):
        tok.decode([5, 32000])


# ---- chat ----

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("name", ["v1", "v3", "v7", "tekken"])
def test_chat_matches_mistral_common(tokenizers, name):
    tok = tokenizers[name]
    expected = tok._mistral.encode_chat_completion(ChatCompletionRequest.from_openai(CHAT)).tokens
    assert tok.encode_chat(CHAT) == expected


def test_chat_v1_spells_inst_as_text(tokenizers):
    tok = tokenizers["v1"]
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "[INST] Hi [/INST]"


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_chat_v3_uses_inst_control_tokens(tokenizers, name):
    tok = tokenizers[name]
    inst, end_inst = (tok._inner.get_special_token(s) for s in ("[INST]", "[/INST]"))
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [tok.bos_id, inst] and ids[-1] == end_inst
    assert ids.count(inst) == 1 and tok.is_special(end_inst)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("Hi", "non-empty list of messages, got a str"),
    (["Hi"], r"messages\[0\] is a str"),
    ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}], "needs a user turn first"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hi"}], "needs a user turn first"),
    ([{"role": "assistant", "content": "Hi"}], "needs a user turn first"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\] has role 'robot'; the role must be one of"),
    ([{"content": "x"}], "has role None"),
    ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "Expected last role User"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x", "tool_call_id": "abc123def"}],
     "Unexpected role 'tool' after role 'user'"),
    ([{"role": "user", "content": 5}], "Unknown content type"),
])
@pytest.mark.parametrize("name", ["v1", "v7"])
def test_bad_chat_is_a_chat_template_error(tokenizers, name, messages, message):
    with pytest.raises(ChatTemplateError, match=message) as info:
        tokenizers[name].encode_chat(messages)
    assert isinstance(info.value, InvalidRequestError) and info.value.param == "messages"


# ---- model directories ----

@pytest.mark.parametrize("files, version", [
    ({"tekken_240911.json": "tekken.json"}, "v3"),
    ({"mistral_instruct_tokenizer_240323.model.v3": "tokenizer.model.v3"}, "v3"),
    ({"tokenizer.model.v1": "tokenizer.model"}, "v1"),
    ({"tokenizer.model.v1": "tokenizer.model.v1", "mistral_instruct_tokenizer_241114.model.v7": "x.model.v7"},
     "v7"),
])
def test_from_model_dir_finds_the_tokenizer_file(tmp_path, files, version):
    for source, target in files.items():
        shutil.copy(DATA / source, tmp_path / target)
    (tmp_path / "params.json").write_text("{}")
    tok = Tokenizer.from_model_dir(tmp_path)
    assert tok.version == version
    assert tok.decode(tok.encode("Hello")) == "Hello"


def test_tekken_json_wins_over_sentencepiece(tmp_path):
    shutil.copy(DATA / "tekken_240911.json", tmp_path / "tekken.json")
    shutil.copy(DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model.v1")
    assert Tokenizer.from_model_dir(str(tmp_path)).vocab_size == 131072


def test_missing_tokenizer_names_the_directory_and_the_files_looked_for(tmp_path):
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerNotFoundError) as info:
        Tokenizer.from_model_dir(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in message and "tekken.json" in message and "tokenizer.model.v" in message


def test_missing_directory_is_tokenizer_not_found(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="is not a directory"):
        Tokenizer.from_model_dir(tmp_path / "nope")


def test_load_prefers_the_name_then_the_directory(tmp_path):
    shutil.copy(DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model.v1")
    assert Tokenizer.load(tmp_path, "v3").version == "v3"
    assert Tokenizer.load(tmp_path, None).version == "v1"
    with pytest.raises(ValueError, match="no tokenizer to load"):
        Tokenizer.load(None, None)


def test_pickles_by_file(tokenizers):
    tok = tokenizers["v3"]
    clone = pickle.loads(pickle.dumps(tok))
    ids = tok.encode("Pickled ✓")
    assert clone.encode("Pickled ✓") == ids and clone.decode(ids, continues_text=True) == " Pickled ✓"


def test_bundled_files_exist_in_mistral_common():
    assert all((DATA / file).is_file() for file in BUNDLED_TOKENIZERS.values())
    assert isinstance(Tokenizer.from_bundled("v1")._mistral, MistralTokenizer)
