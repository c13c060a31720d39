"""Small but real tekken tokenizers of any instruct version, and tiny checkpoints that use them.

mistral-common bundles one tekken file, `tekken_240911.json`: version v3, 131072 ids, and none of the
control tokens later versions added ([ARGS] and [CALL_ID] from v11, [THINK] and [/THINK] with v13). Tests of
tool calls and reasoning need those versions, and a test model needs a small vocabulary. `write_tekken`
derives such a file from the bundled one at test time, so nothing binary is committed and nothing is
downloaded:

* 1000 control slots, as in the released files: the 20 of v3 at ranks 0-19 (<unk>, <s>, </s>, [INST],
  [/INST], [AVAILABLE_TOOLS] ... [TOOL_CALLS], [SYSTEM_PROMPT], [/SYSTEM_PROMPT], [TOOL_CONTENT]), [ARGS] and
  [CALL_ID] at 32 and 33 from v11 on (where mistral-common's own test tokenizers put them), [THINK] and
  [/THINK] at 34 and 35 for v13, and `<SPECIAL_n>` fillers in every other slot;
* the bundled file's first `vocab_size - 1000` byte-level BPE ranks. The first 256 are the single bytes, so
  any UTF-8 text still encodes (into more tokens than with all merges), and the merges kept are the earliest,
  most frequent ones, so ordinary English text stays fairly short.

Look control tokens up by name (`tokenizer.get_special_token("[THINK]")`), not by the ranks above.

    checkpoint = write_checkpoint(tmp_path / "v13")   # config.json + model.safetensors + tekken.json
    llm = LLM(str(checkpoint), dtype="float32", progress=False, max_model_len=512)
"""

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from mistral_common.tokens.tokenizers.base import SpecialTokens, TokenizerVersion
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

BASE_TEKKEN = resources.files("mistral_common") / "data" / "tekken_240911.json"
TEKKEN_FILE = "tekken.json"
NUM_SPECIAL_TOKENS = 1000
DEFAULT_VOCAB_SIZE = 4096  # 1000 control slots + the 256 bytes + 2840 merges
# The control tokens each version adds to the 20 of v3 (`Tekkenizer.DEPRECATED_SPECIAL_TOKENS`), by rank.
_ADDED_SPECIAL_TOKENS: dict[TokenizerVersion, dict[int, SpecialTokens]] = {
    TokenizerVersion.v3: {},
    TokenizerVersion.v7: {},
    TokenizerVersion.v11: {32: SpecialTokens.args, 33: SpecialTokens.call_id},
    TokenizerVersion.v13: {32: SpecialTokens.args, 33: SpecialTokens.call_id,
                           34: SpecialTokens.begin_think, 35: SpecialTokens.end_think},
}
SUPPORTED_VERSIONS = tuple(version.value for version in _ADDED_SPECIAL_TOKENS)


@cache
def _base_tekken() -> tuple[str, tuple[dict[str, Any], ...]]:
    """The bundled file's split pattern and its 150000 byte-level ranks, read once per process."""
    data = json.loads(BASE_TEKKEN.read_text(encoding="utf-8"))
    return data["config"]["pattern"], tuple(data["vocab"])


def _special_tokens(version: TokenizerVersion) -> list[dict[str, Any]]:
    """All `NUM_SPECIAL_TOKENS` control tokens of `version`, as the file's "special_tokens" list."""
    names = {info["rank"]: info["token_str"] for info in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
    names.update(_ADDED_SPECIAL_TOKENS[version])
    return [{"rank": rank, "token_str": str(names.get(rank, f"<SPECIAL_{rank}>")), "is_control": True}
            for rank in range(NUM_SPECIAL_TOKENS)]


def write_tekken(path: Path, version: str = "v13", vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write `path/tekken.json`, a tekken tokenizer of instruct `version` with `vocab_size` ids (the 1000
    control slots included), and return the file's path. `MistralTokenizer.from_file` loads it."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"tokenizer version {version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}")
    pattern, ranks = _base_tekken()
    if not NUM_SPECIAL_TOKENS + 256 <= vocab_size <= NUM_SPECIAL_TOKENS + len(ranks):
        raise ValueError(f"vocab_size must be in [{NUM_SPECIAL_TOKENS + 256}, {NUM_SPECIAL_TOKENS + len(ranks)}] "
                         f"(the control slots and every single byte), got {vocab_size}")
    vocab = list(ranks[:vocab_size - NUM_SPECIAL_TOKENS])
    model = {
        "config": {"pattern": pattern, "num_vocab_tokens": len(vocab), "default_vocab_size": vocab_size,
                   "default_num_special_tokens": NUM_SPECIAL_TOKENS, "version": version},
        "vocab": vocab,
        "special_tokens": _special_tokens(TokenizerVersion(version)),
        "version": 1,
        "type": "Tekken",
    }
    path.mkdir(parents=True, exist_ok=True)
    file = path / TEKKEN_FILE
    file.write_text(json.dumps(model), encoding="utf-8")
    return file


def write_checkpoint(path: Path, tokenizer_version: str = "v13", seed: int = 0) -> Path:
    """A random-init fp32 dense Mistral saved by transformers itself (hidden 64, 2 layers, 4 heads, 2 KV heads)
    whose vocabulary is that of the `write_tekken` tokenizer written beside it; returns the directory."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=DEFAULT_VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           rope_theta=10_000.0, sliding_window=None, tie_word_embeddings=False)
    MistralForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    write_tekken(path, tokenizer_version, DEFAULT_VOCAB_SIZE)
    return path
