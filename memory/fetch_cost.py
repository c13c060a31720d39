"""Whether loading cached blocks from a tier beats computing them again: decided per request, from measurements.

Design note. A lower tier is only worth reading when the read is faster than the prefill it saves. Both
costs are measured as the engine runs:

* compute: seconds per prefill token, from the engine's own steps (an exponential moving average);
* fetch, per tier: a line `latency + n * per_block` fitted (least squares) to the recent reads of that tier,
  so a remote store's round trip is not mistaken for a per-block cost, nor the reverse.

`blocks_worth_fetching(tier, n)` answers how many of `n` leading blocks to load: all of them when the fitted
read of `n` blocks costs less than computing their `n * block_size` tokens, else none (a prefix is loaded
whole or not at all; the blocks after a skipped one would be useless). Until a tier has been read twice it is
tried, so that it gets measured. SGLang's file tier is an example of why this matters: it measured 2.45 s to
load an 8K prompt that took 1.73 s to recompute.
"""

import threading
from collections import deque

_SAMPLES = 32  # recent reads per tier that the line is fitted to


class FetchCost:
    def __init__(self, block_size: int, smoothing: float = 0.2):
        self.block_size = block_size
        self.smoothing = smoothing
        self.compute_s_per_token: float | None = None
        self._reads: dict[str, deque[tuple[int, float]]] = {}
        self._lock = threading.Lock()  # reads are observed on loader threads, compute on the engine's

    def observe_compute(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0:
            return
        sample = seconds / num_tokens
        with self._lock:
            old = self.compute_s_per_token
            self.compute_s_per_token = sample if old is None else old + self.smoothing * (sample - old)

    def observe_fetch(self, tier: str, num_blocks: int, seconds: float) -> None:
        if num_blocks > 0:
            with self._lock:
                self._reads.setdefault(tier, deque(maxlen=_SAMPLES)).append((num_blocks, seconds))

    def fetch_line(self, tier: str) -> tuple[float, float] | None:
        """(latency s, s per block) fitted to the tier's recent reads; None before two reads."""
        with self._lock:
            reads = list(self._reads.get(tier, ()))
        if len(reads) < 2:
            return None
        mean_n = sum(n for n, _ in reads) / len(reads)
        mean_s = sum(s for _, s in reads) / len(reads)
        spread = sum((n - mean_n) ** 2 for n, _ in reads)
        if spread == 0:  # every read the same size: no way to split latency from size; charge it all per block
            return 0.0, mean_s / mean_n
        slope = max(0.0, sum((n - mean_n) * (s - mean_s) for n, s in reads) / spread)
        return max(0.0, mean_s - slope * mean_n), slope

    def fetch_seconds(self, tier: str, num_blocks: int) -> float | None:
        """The fitted time to read `num_blocks` from `tier`; None before two reads."""
        line = self.fetch_line(tier)
        return None if line is None else line[0] + num_blocks * line[1]

    def blocks_worth_fetching(self, tier: str, num_blocks: int) -> int:
        line, per_token = self.fetch_line(tier), self.compute_s_per_token
        if num_blocks <= 0 or line is None or per_token is None:
            return num_blocks
        latency, per_block = line
        return num_blocks if latency + num_blocks * per_block < num_blocks * self.block_size * per_token else 0

    def describe(self) -> dict:
        tiers = {}
        for tier in list(self._reads):
            line = self.fetch_line(tier)
            if line is not None:
                tiers[tier] = {"latency_s": line[0], "s_per_block": line[1]}
        return {"compute_s_per_token": self.compute_s_per_token, "fetch": tiers}
