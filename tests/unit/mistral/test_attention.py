import pytest
import torch

from mistral.attention import attend, causal_mask, window_mask


@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (4, 4)])
def test_fused_causal_path_equals_explicit_mask(n_heads, n_kv):
    torch.manual_seed(0)
    q, k, v = torch.randn(37, n_heads, 16), torch.randn(37, n_kv, 16), torch.randn(37, n_kv, 16)
    pos = torch.arange(37)
    assert causal_mask(pos, pos, None) is None
    fused = attend(q, k, v, None)
    explicit = attend(q, k, v, window_mask(pos, pos, None))
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_causal_mask_keeps_explicit_mask_when_it_differs_from_plain_causal():
    pos = torch.arange(10)
    assert causal_mask(pos, pos, 10) is None  # the window covers every key
    assert causal_mask(pos, pos, 9) is not None  # the window cuts the oldest key
    assert causal_mask(pos[4:], pos, None) is not None  # a cached prefix
    assert causal_mask(pos + 3, pos + 3, None) is not None  # not from position 0
