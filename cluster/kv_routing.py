"""KV-aware routing: the Ingress sends a request to the attention shard that holds its longest cached prefix,
unless that shard is much busier than the others.

Design note (after NVIDIA Dynamo's KV router and SGLang's cache-aware router). A prompt's full blocks are
named by the same sha256 chain the engine uses (`memory.block_hash`, under the model's keyspace), so two
sources can say which shard holds which prefix:

* what the shards report: every shard answers Serve's `record_routing_stats` with the names of the blocks in
  its device pool and host RAM (`AttentionShard.record_routing_stats`), every `stats_period_s`; every Ingress
  replica's router gets them. This is the truth, a period late. The report also carries the keyspace's root,
  which depends on the weights: the router takes it from there, so building the application needs only the
  model's config, not its weights (until the first report, requests go to the least busy shards).
* what this router sent: a `PrefixIndex` from block name to the shard it last sent that prefix to, bounded
  and least-recently-used. This is immediate, but each Ingress replica knows only its own traffic.

For a request, each live shard's match is the longest prefix of the request's chain it holds by either source
(`warm_shard`): a chat's next turn starts with the whole previous turn, so it returns to the shard that holds
that turn. Then load decides (`rank_shards`):

* warm shard known, and its queue at most `max_imbalance` requests longer than the shortest queue: the warm
  shard first, then the others by queue length;
* warm shard too busy, or no shard warm: the least busy shards first (power of two choices: two at random,
  the shorter queue first). The shard that gets the request pulls its prefix from the shared MemoryStore (T2)
  when the store has it.

Serve tries the shards of each rank in order and skips one that refuses (its `max_ongoing_requests` is
reached). Queue lengths are Serve's cached probes of each replica.

Knobs (`attention.routing` in the config): `policy` ("kv-aware" or Serve's "power-of-two"), `max_imbalance`,
`index_blocks` (the index's bound), `max_prefix_blocks` (the longest prefix looked at), `stats_period_s`.
"""

import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from ray.serve._private.request_router.request_router import RequestRouter

from memory.block_hash import hash_block


class PrefixIndex:
    """Block name -> the shard a request with that prefix was last sent to; LRU, at most `max_entries`."""

    def __init__(self, keyspace_root: bytes, block_size: int = 16, max_entries: int = 65_536,
                 max_prefix_blocks: int = 256):
        self.keyspace_root = keyspace_root
        self.block_size, self.max_entries, self.max_prefix_blocks = block_size, max_entries, max_prefix_blocks
        self._owner: OrderedDict[bytes, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def chain(self, token_ids: Sequence[int]) -> list[bytes]:
        """The names of the prompt's full blocks (at most `max_prefix_blocks`)."""
        parent, names = None, []
        for start in range(0, min(len(token_ids) // self.block_size, self.max_prefix_blocks) * self.block_size,
                           self.block_size):
            parent = hash_block(parent, token_ids[start:start + self.block_size], self.keyspace_root)
            names.append(parent)
        return names

    def matches(self, chain: Sequence[bytes]) -> dict[Hashable, int]:
        """Shard -> the longest prefix of `chain` (in blocks) last sent to it."""
        found: dict[Hashable, int] = {}
        for length in range(len(chain), 0, -1):
            owner = self._owner.get(chain[length - 1])
            if owner is not None:
                found.setdefault(owner, length)
        return found

    def record(self, chain: Sequence[bytes], shard: Hashable) -> None:
        for name in chain:
            self._owner[name] = shard
            self._owner.move_to_end(name)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)


def warm_shard(chain: Sequence[bytes], sent: dict[Hashable, int], reported: dict[Hashable, set[bytes]]
               ) -> Hashable | None:
    """The shard with the longest match of `chain`: by what it was sent (`PrefixIndex.matches`) or by the
    names it reported holding; None when no shard matches a block. Only shards in `reported` (the live
    ones; an empty set when one has not reported yet) are considered."""
    best, best_len = None, 0
    for shard, names in reported.items():
        held = 0
        while held < len(chain) and chain[held] in names:
            held += 1
        length = max(held, sent.get(shard, 0))
        if length > best_len:
            best, best_len = shard, length
    return best


def rank_shards(warm: Hashable | None, queue_lens: dict[Hashable, int | None], max_imbalance: int,
                rng: random.Random = random) -> list[list[Hashable]]:
    """Ranks of shards to try in order (see the module docstring). Unknown queue lengths count as 0."""
    shards = list(queue_lens)
    load = {s: queue_lens[s] or 0 for s in shards}
    if warm is not None and warm in load and load[warm] - min(load.values()) <= max_imbalance:
        rest = sorted((s for s in shards if s != warm), key=load.__getitem__)
        return [[warm], rest] if rest else [[warm]]
    pair = rng.sample(shards, min(2, len(shards)))
    first = sorted(pair, key=load.__getitem__)
    rest = sorted((s for s in shards if s not in pair), key=load.__getitem__)
    return [first, rest] if rest else [first]


class KVAwareRouter(RequestRouter):
    """Serve's request router for the AttentionShard deployment (`request_router_config`)."""

    def initialize_state(self, max_imbalance: int = 1, index_blocks: int = 65_536, max_prefix_blocks: int = 256,
                         block_size: int = 16):
        self.max_imbalance, self.block_size = max_imbalance, block_size
        self.index_blocks, self.max_prefix_blocks = index_blocks, max_prefix_blocks
        self.index: PrefixIndex | None = None  # made once a shard has said which keyspace it names blocks in
        self._reported: dict[Hashable, tuple[list, set[bytes]]] = {}  # replica -> (its last report, as a set)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        chain = self._chain(pending_request, candidate_replicas)
        warm = warm_shard(chain, self.index.matches(chain), {i: self._held(r) for i, r in by_id.items()}) \
            if chain else None
        queue_lens = {replica_id: self.replica_queue_len_cache.get(replica_id) for replica_id in by_id}
        return [[by_id[i] for i in rank] for rank in rank_shards(warm, queue_lens, self.max_imbalance)]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        chain = self._chain(pending_request, ())
        if chain:
            self.index.record(chain, replica_id)

    def _held(self, replica) -> set[bytes]:
        """The block names the replica last reported, as a set (converted once per report)."""
        names = (replica.routing_stats or {}).get("kv_blocks") or []
        cached = self._reported.get(replica.replica_id)
        if cached is None or cached[0] is not names:
            if len(self._reported) > 2 * len(self._replicas) + 8:  # forget replicas that went away
                self._reported = {k: v for k, v in self._reported.items() if k in self._replicas}
            cached = self._reported[replica.replica_id] = (names, set(names))
        return cached[1]

    @staticmethod
    def _token_ids(pending_request) -> Sequence[int]:
        """The prompt's token ids: the first argument of `AttentionShard.stream` (a health probe has none)."""
        if pending_request is None or not pending_request.args or not isinstance(pending_request.args[0], list):
            return ()
        return pending_request.args[0]

    def _chain(self, pending_request, replicas) -> list[bytes]:
        """The prompt's block names; none until a shard among `replicas` (or an earlier one) has reported the
        keyspace the shards' engines name blocks in (it depends on the weights, which the shards read)."""
        if self.index is None:
            root = next((stats["keyspace_root"] for r in replicas
                         if "keyspace_root" in (stats := r.routing_stats or {})), None)
            if root is None:
                return []
            self.index = PrefixIndex(bytes.fromhex(root), self.block_size, self.index_blocks, self.max_prefix_blocks)
        return self.index.chain(self._token_ids(pending_request))
