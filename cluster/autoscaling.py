"""`RoutedTokensPolicy`: Serve autoscaling of one expert group on the tokens routed to it.

Request counts say nothing about an expert group: every layer of every request may or may not reach it. Each
ExpertGroup replica reports `routed_tokens_per_s` (its `record_autoscaling_stats`); this policy sizes the
group so each replica takes about `target_tokens_per_s`. Serve applies the deployment's bounds and its
up/downscale delays around the decision, so a hot group grows and a cold one shrinks independently.
"""

import math


class RoutedTokensPolicy:
    def __init__(self, target_tokens_per_s: float):
        if target_tokens_per_s <= 0:
            raise ValueError(f"target_tokens_per_s must be positive, got {target_tokens_per_s}")
        self.target = target_tokens_per_s

    def __call__(self, ctx) -> tuple[int, dict]:
        rates = (ctx.aggregated_metrics or {}).get("routed_tokens_per_s", {})
        if not rates:  # nothing reported yet: keep what Serve decided
            return ctx.target_num_replicas, {}
        desired = math.ceil(sum(rates.values()) / self.target)
        return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, desired)), {}
