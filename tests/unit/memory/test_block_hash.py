"""Block names: deterministic, chained over every earlier token, separated by keyspace, equal to a reference."""

import doctest
import hashlib
import struct

import pytest

import memory.block_hash
from memory.block_hash import BlockKeyspace, hash_block

KEYSPACE = BlockKeyspace("mistralai/Mixtral-8x7B-v0.1", "bfloat16", 16)


def reference_hash(parent: bytes | None, token_ids: list[int], root: bytes) -> bytes:
    """The documented encoding, written the slow, obvious way."""
    encoded = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return hashlib.sha256((root if parent is None else parent) + encoded).digest()


def test_known_answer():
    assert KEYSPACE.root.hex() == "348f43cf417210374673388578039a5bf48891a2f08a9a9fdf37f0bb57a8cb44"
    first = hash_block(None, range(16), KEYSPACE.root)
    assert first.hex() == "ee56951a97f7c848fbc1c2f46a2acf6b5e6bcd6faceff098e38cda3fb9ba9358"
    second = hash_block(first, [1, 2, 3, -1, 2**62], KEYSPACE.root)
    assert second.hex() == "2787c1da04715168d616af5b4a7ee67ff242e402ced22aae074bd31c12cc7aeb"


def test_equals_the_reference_encoding_along_a_chain():
    tokens = [(i * 7919) % 32_000 for i in range(64)]
    fast = slow = None
    for start in range(0, 64, 16):
        fast = hash_block(fast, tokens[start:start + 16], KEYSPACE.root)
        slow = reference_hash(slow, tokens[start:start + 16], KEYSPACE.root)
        assert fast == slow and len(fast) == 32


def test_deterministic():
    assert hash_block(None, [5, 6, 7], KEYSPACE.root) == hash_block(None, (5, 6, 7), KEYSPACE.root)
    assert BlockKeyspace("m", "float32", 16).root == BlockKeyspace("m", "float32", 16).root


def test_a_block_depends_on_every_token_before_it():
    a = hash_block(None, [1, 2], KEYSPACE.root)
    b = hash_block(None, [1, 3], KEYSPACE.root)
    assert hash_block(a, [9, 9], KEYSPACE.root) != hash_block(b, [9, 9], KEYSPACE.root)
    assert hash_block(a, [9, 9], KEYSPACE.root) != hash_block(None, [9, 9], KEYSPACE.root)


def test_token_order_and_width_matter():
    assert hash_block(None, [1, 2], KEYSPACE.root) != hash_block(None, [2, 1], KEYSPACE.root)
    assert hash_block(None, [256], KEYSPACE.root) != hash_block(None, [1, 0], KEYSPACE.root)


@pytest.mark.parametrize("other", [BlockKeyspace("other-model", "bfloat16", 16),
                                   BlockKeyspace("mistralai/Mixtral-8x7B-v0.1", "float16", 16),
                                   BlockKeyspace("mistralai/Mixtral-8x7B-v0.1", "bfloat16", 32)])
def test_keyspaces_never_share_names(other):
    assert other.root != KEYSPACE.root
    assert hash_block(None, range(16), other.root) != hash_block(None, range(16), KEYSPACE.root)


@pytest.mark.parametrize("fields", [("", "bfloat16", 16), ("m", "", 16), ("m", "bfloat16", 0)])
def test_rejects_an_incomplete_keyspace(fields):
    with pytest.raises(ValueError):
        BlockKeyspace(*fields)


def test_docstring_example_holds():
    assert doctest.testmod(memory.block_hash).failed == 0
