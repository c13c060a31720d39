"""KV-aware routing's pure parts: the prefix index and the ranking of shards by warmth and load."""

import random

from hypothesis import given
from hypothesis import strategies as st

from cluster.kv_routing import PrefixIndex, rank_shards, warm_shard

TURN_1 = list(range(100, 150))  # three full blocks and two tokens
TURN_2 = TURN_1 + list(range(500, 540))  # the next turn starts with the whole previous one
ROOT = b"root"


def test_a_chats_next_turn_finds_the_shard_of_its_previous_turn():
    index = PrefixIndex(ROOT, block_size=16)
    index.record(index.chain(TURN_1), "a")
    index.record(index.chain(list(range(900, 980))), "b")
    chain = index.chain(TURN_2)
    assert chain[:3] == index.chain(TURN_1) and index.matches(chain) == {"a": 3}
    assert warm_shard(chain, index.matches(chain), {"a": set(), "b": set()}) == "a"
    assert warm_shard(chain, index.matches(chain), {"b": set()}) is None  # a's shard went away
    assert warm_shard(index.chain(list(range(16))), {}, {"a": set(), "b": set()}) is None


def test_the_longest_prefix_wins_whoever_says_so():
    index = PrefixIndex(ROOT, block_size=16)
    index.record(index.chain(TURN_1[:32]), "a")
    chain = index.chain(TURN_2)  # five blocks
    assert warm_shard(chain, index.matches(chain), {"a": set(), "b": set(chain[:4])}) == "b"  # b reported 4
    assert warm_shard(chain, index.matches(chain), {"a": set(chain), "b": set(chain[:4])}) == "a"
    assert warm_shard(chain, {}, {"a": set(chain[1:])}) is None  # held blocks must start the chain
    index.record(chain, "b")  # b was sent the longer prefix and now owns the shared blocks too
    assert index.matches(chain) == {"b": 5}


@given(st.lists(st.lists(st.integers(0, 31), min_size=0, max_size=80), max_size=30), st.integers(1, 20))
def test_the_index_never_holds_more_than_its_bound(prompts, bound):
    index = PrefixIndex(ROOT, block_size=4, max_entries=bound, max_prefix_blocks=8)
    for i, prompt in enumerate(prompts):
        index.record(index.chain(prompt), i % 3)
        assert len(index) <= bound and len(index.chain(prompt)) <= 8


def test_a_warm_shard_within_the_imbalance_goes_first_else_the_least_busy():
    lens = {"a": 5, "b": 1, "c": 3}
    assert rank_shards("a", lens, max_imbalance=4) == [["a"], ["b", "c"]]
    ranks = rank_shards("a", lens, max_imbalance=3, rng=random.Random(0))  # a is 4 busier than b
    assert ranks[0][0] != "a" or len(ranks[0]) == 2 and lens[ranks[0][0]] <= lens[ranks[0][1]]
    assert rank_shards(None, {"a": None}, max_imbalance=0) == [["a"]]


@given(st.dictionaries(st.sampled_from("abcdef"), st.one_of(st.none(), st.integers(0, 50)), min_size=1),
       st.one_of(st.none(), st.sampled_from("abcdefz")), st.integers(0, 10), st.integers(0, 1000))
def test_every_shard_is_ranked_exactly_once(lens, warm, max_imbalance, seed):
    ranks = rank_shards(warm, lens, max_imbalance, rng=random.Random(seed))
    flat = [s for rank in ranks for s in rank]
    assert sorted(flat) == sorted(lens) and all(ranks)
    load = {s: v or 0 for s, v in lens.items()}
    if warm in lens and load[warm] - min(load.values()) <= max_imbalance:
        assert ranks[0] == [warm]
    else:
        assert load[ranks[0][0]] <= min(load[s] for s in ranks[0])


def test_the_router_names_blocks_in_the_keyspace_the_shards_report(tiny_llm):
    """The router learns the keyspace from a shard's report (no weights at build time), and then names a prompt's
    blocks as that shard's engine does; until a report, it names none and load alone decides."""
    from types import SimpleNamespace

    from cluster.kv_routing import KVAwareRouter
    from engine import AsyncLLM, SamplingParams

    router = KVAwareRouter.__new__(KVAwareRouter)  # Serve builds routers; only its state is needed here
    router.initialize_state(block_size=16)
    prompt = SimpleNamespace(args=[TURN_1])
    assert router._chain(prompt, [SimpleNamespace(routing_stats={})]) == []
    tiny_llm.generate([TURN_1], SamplingParams(max_tokens=1))
    engine = tiny_llm.engine
    report = {"kv_blocks": engine.cached_block_names(64), "keyspace_root": engine.keyspace.root.hex()}
    chain = router._chain(prompt, [SimpleNamespace(routing_stats={}), SimpleNamespace(routing_stats=report)])
    assert len(chain) == 3 and set(chain) <= set(report["kv_blocks"])
    assert router._chain(prompt, []) == chain  # kept once learnt
    assert AsyncLLM.keyspace_root.fget(SimpleNamespace(llm=tiny_llm)) == engine.keyspace.root
