"""`RoutedTokensPolicy`: Serve autoscaling of one expert group on the tokens routed to it.

Request counts say nothing about an expert group: every layer of every request may or may not reach it. Each
ExpertGroup replica reports `routed_tokens_per_s` (its `record_autoscaling_stats`); Serve averages each
replica's reports over the look-back window, and this policy sizes the group so each replica takes about
`target_tokens_per_s`:

    replicas 1200 + 1500 tokens/s, target 1000 -> ceil(2700 / 1000) = 3 replicas (within the bounds)

Serve applies the up/downscale delays around the decision, so a hot group grows and a cold one shrinks
independently. Each change of the wanted count is logged once, with the signal behind it, in Serve's
controller log (`logs/serve/controller_*.log`).
"""

import logging
import math

# A child of Serve's logger: the decisions land in the controller's log, beside Serve's own scaling lines.
logger = logging.getLogger("ray.serve").getChild("msem.autoscaling")


class RoutedTokensPolicy:
    """Serve builds one instance per deployment and calls it on every control-loop tick (10 per second)."""

    def __init__(self, target_tokens_per_s: float):
        if target_tokens_per_s <= 0:
            raise ValueError(f"target_tokens_per_s must be positive, got {target_tokens_per_s}")
        self.target = target_tokens_per_s
        self.wanted: int | None = None  # the last count this policy asked for

    def __call__(self, ctx) -> tuple[int, dict]:
        rates = (ctx.aggregated_metrics or {}).get("routed_tokens_per_s", {})
        if not rates:  # nothing reported yet: keep what Serve decided
            return ctx.target_num_replicas, {}
        routed = sum(rates.values())
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        wanted = max(lo, min(hi, math.ceil(routed / self.target)))
        if wanted != (ctx.target_num_replicas if self.wanted is None else self.wanted):
            logger.info("%s: %d -> %d replicas wanted: %.1f routed tokens/s (%.1f per replica over %d), "
                        "target %.1f per replica, bounds [%d, %d]", ctx.deployment_name, ctx.target_num_replicas,
                        wanted, routed, routed / len(rates), len(rates), self.target, lo, hi)
        self.wanted = wanted
        return wanted, {}
