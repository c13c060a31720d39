"""`spread_experts`: properties over random holdings (hypothesis), the docstring example, and refused input."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.device_spread import spread_experts

holdings = st.dictionaries(st.integers(0, 60), st.sets(st.integers(0, 127), max_size=20), max_size=8)


@settings(max_examples=200, deadline=None)
@given(holdings, st.integers(1, 9))
def test_spread_properties(held, num_devices):
    plan = spread_experts(held, num_devices)
    assert {layer: set(experts) for layer, experts in plan.items()} == held  # every pair once, nothing else
    assert all(0 <= d < num_devices for experts in plan.values() for d in experts.values())
    per_layer = [Counter(experts.values()) for experts in plan.values()]
    for counts in [*per_layer, sum(per_layer, Counter())]:  # each layer, then the totals
        counts = [counts[d] for d in range(num_devices)]
        assert max(counts) - min(counts) <= 1
    shuffled = {layer: sorted(held[layer], reverse=True) for layer in reversed(list(held))}
    assert spread_experts(shuffled, num_devices) == plan  # deterministic, whatever order the input comes in


def test_the_docstring_example():
    assert spread_experts({0: (0, 2, 5, 7), 1: (1, 4)}, 3) == {0: {0: 0, 2: 1, 5: 2, 7: 0}, 1: {1: 1, 4: 2}}


@pytest.mark.parametrize("held,num_devices,match", [
    ({0: (0, 1)}, 0, "num_devices is 0; a group needs at least one device"),
    ({0: (0, 1), 1: (2, 2)}, 2, r"layer 1 holds \[2, 2\]: expert ids must be distinct"),
    ({0: (-1, 3)}, 2, "non-negative"),
])
def test_bad_input_is_refused(held, num_devices, match):
    with pytest.raises(ValueError, match=match):
        spread_experts(held, num_devices)
