"""Sampler: greedy is argmax, filters equal their limits, seeds are batch-independent, frequencies match.

Shape legend: B rows, V vocabulary, T scored tokens.
"""

import math

import pytest
import torch

from engine.sampler import (Logprobs, SamplingState, apply_min_p, apply_penalties, compute_logprobs, sample)
from engine.sampling_params import SamplingParams

VOCAB = 4
LOGITS_4 = torch.tensor([1.0, 0.5, 0.0, -1.0])  # [V]: softmax ~ [0.47, 0.29, 0.17, 0.06]


def _states(params: SamplingParams, num_rows: int) -> list[SamplingState]:
    return [SamplingState(params) for _ in range(num_rows)]


def _frequencies(logits_row: torch.Tensor, params: SamplingParams, num_rows: int = 20_000) -> torch.Tensor:
    """Empirical token frequencies [V] of `num_rows` unseeded draws, from a fixed global seed."""
    logits = logits_row.expand(num_rows, -1).contiguous()  # [B, V]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        token_ids = sample(logits, _states(params, num_rows)).token_ids
    return torch.bincount(torch.tensor(token_ids), minlength=logits.shape[1]).float() / num_rows


def _random_logits(num_rows: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * 3  # [B, V]


# --- greedy and filters at their limits ------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = _random_logits(8, 100, seed=1)
    out = sample(logits, _states(SamplingParams(temperature=0), 8))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                                    SamplingParams(min_p=1.0), SamplingParams(temperature=1e-3, top_k=5)])
def test_extreme_filters_equal_greedy(params):
    logits = _random_logits(64, 100, seed=2)
    assert sample(logits, _states(params, 64)).token_ids == logits.argmax(dim=-1).tolist()


def test_min_p_drops_tokens_below_fraction_of_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # [1, V]; min_p 0.2 -> threshold 0.1
    filtered = apply_min_p(probs.log(), torch.tensor([0.2]))
    assert torch.isinf(filtered[0, 3]) and torch.isfinite(filtered[0, :3]).all()
    frequencies = _frequencies(probs[0].log(), SamplingParams(min_p=0.2), num_rows=5_000)
    assert frequencies[3] == 0
    assert torch.allclose(frequencies[:3], probs[0, :3] / 0.95, atol=0.03)


# --- empirical distributions -----------------------------------------------------------------------------

def test_frequencies_match_softmax():
    frequencies = _frequencies(LOGITS_4, SamplingParams())
    assert torch.allclose(frequencies, LOGITS_4.softmax(dim=-1), atol=0.02)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    frequencies = _frequencies(LOGITS_4, SamplingParams(temperature=temperature))
    assert torch.allclose(frequencies, (LOGITS_4 / temperature).softmax(dim=-1), atol=0.02)


def test_near_zero_temperature_concentrates_on_the_argmax():
    frequencies = _frequencies(LOGITS_4, SamplingParams(temperature=1e-2), num_rows=2_000)
    assert frequencies.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_k_renormalises_over_the_k_best():
    frequencies = _frequencies(LOGITS_4, SamplingParams(top_k=2))
    expected = torch.cat([LOGITS_4[:2].softmax(dim=-1), torch.zeros(2)])
    assert torch.allclose(frequencies, expected, atol=0.02)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Sorted probs ~ [0.47, 0.29, 0.17, 0.06]: 0.47 < 0.7, 0.47 + 0.29 >= 0.7, so two tokens survive.
    frequencies = _frequencies(LOGITS_4, SamplingParams(top_p=0.7))
    expected = torch.cat([LOGITS_4[:2].softmax(dim=-1), torch.zeros(2)])
    assert torch.allclose(frequencies, expected, atol=0.02)


def test_seeded_rows_also_follow_softmax():
    states = [SamplingState.from_params(SamplingParams(seed=seed)) for seed in range(2_000)]
    token_ids = sample(LOGITS_4.expand(2_000, -1).contiguous(), states).token_ids
    frequencies = torch.bincount(torch.tensor(token_ids), minlength=VOCAB).float() / 2_000
    assert torch.allclose(frequencies, LOGITS_4.softmax(dim=-1), atol=0.05)


# --- seeding ---------------------------------------------------------------------------------------------

def _run_seeded(seed_params: SamplingParams, others: list[SamplingParams], position: int,
                num_steps: int = 20) -> list[int]:
    """Tokens of the seeded row over `num_steps`, sampled at `position` among `others`."""
    seeded = SamplingState.from_params(seed_params, prompt_token_ids=[1, 2, 3])
    batch = [SamplingState.from_params(p) for p in others]
    batch.insert(position, seeded)
    tokens = []
    for step in range(num_steps):
        row_logits = _random_logits(1, 50, seed=100 + step)  # the seeded row sees the same logits every run
        logits = _random_logits(len(batch), 50, seed=step)  # [B, V]
        logits[position] = row_logits[0]
        token_ids = sample(logits, batch).token_ids
        tokens.append(token_ids[position])
        for state, token_id in zip(batch, token_ids):
            state.output_token_ids.append(token_id)
    return tokens


@pytest.mark.parametrize("seed_params", [SamplingParams(seed=7), SamplingParams(seed=7, top_k=10, top_p=0.9),
                                         SamplingParams(seed=7, min_p=0.05, repetition_penalty=1.3)])
def test_seeded_row_is_independent_of_its_batch(seed_params):
    alone = _run_seeded(seed_params, [], position=0)
    others = [SamplingParams(seed=1), SamplingParams(), SamplingParams(temperature=0),
              SamplingParams(top_k=3, presence_penalty=1.0, logprobs=2)]
    in_batch = _run_seeded(seed_params, others, position=3)
    with torch.random.fork_rng():
        torch.manual_seed(999)  # unseeded neighbours draw differently; the seeded row must not care
        in_batch_again = _run_seeded(seed_params, others[::-1], position=1)
    assert alone == in_batch == in_batch_again
    assert len(set(alone)) > 1  # really sampled, not collapsed to greedy


def test_different_seeds_give_different_tokens():
    first = _run_seeded(SamplingParams(seed=1), [], position=0)
    second = _run_seeded(SamplingParams(seed=2), [], position=0)
    assert first != second
    assert first == _run_seeded(SamplingParams(seed=1), [], position=0)


def test_seeded_rows_leave_the_global_generator_alone():
    states = [SamplingState.from_params(SamplingParams(seed=s)) for s in range(3)]
    before = torch.get_rng_state()
    sample(_random_logits(3, 20, seed=0), states)
    assert torch.equal(before, torch.get_rng_state())


def test_greedy_rows_do_not_consume_their_generator():
    state = SamplingState.from_params(SamplingParams(seed=5, temperature=0))
    before = state.generator.get_state()
    sample(_random_logits(1, 20, seed=0), [state])
    assert torch.equal(before, state.generator.get_state())


# --- penalties -------------------------------------------------------------------------------------------

def test_penalties_worked_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])  # [1, V]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    state = SamplingState(params, prompt_token_ids=[0, 1], output_token_ids=[1, 2, 2])
    # repetition: seen {0, 1, 2} -> [1, -2, 0.25, 3, -2]; then output counts {1: 1, 2: 2}
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 0.25, 0.25 - 0.5 - 0.5, 3.0, -2.0]])
    assert torch.equal(apply_penalties(logits.clone(), [state]), expected)


def test_presence_and_frequency_ignore_the_prompt_and_rows_differ():
    logits = torch.zeros(2, 4)  # [B, V]
    states = [SamplingState(SamplingParams(presence_penalty=1.0), prompt_token_ids=[0], output_token_ids=[3]),
              SamplingState(SamplingParams(frequency_penalty=-0.5), prompt_token_ids=[], output_token_ids=[1, 1])]
    expected = torch.tensor([[0.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(apply_penalties(logits, states), expected)


def test_default_params_leave_logits_untouched():
    logits = _random_logits(2, 10, seed=3)
    states = [SamplingState(SamplingParams(), prompt_token_ids=[1, 2], output_token_ids=[3])] * 2
    assert torch.equal(apply_penalties(logits.clone(), states), logits)


def test_greedy_takes_argmax_of_penalised_logits():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    state = SamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_token_ids=[0])
    assert sample(logits, [state]).token_ids == [1]  # 3 / 2 = 1.5 < 2.5
    assert torch.equal(logits, torch.tensor([[3.0, 2.5, 0.0]]))  # the caller's logits are not modified


# --- logprobs --------------------------------------------------------------------------------------------

def test_compute_logprobs_matches_log_softmax():
    logits = _random_logits(5, 30, seed=4)  # [T, V]
    token_ids = [0, 7, 29, 3, 3]
    reference = torch.log_softmax(logits, dim=-1)  # [T, V]
    result = compute_logprobs(logits, token_ids, num_top=4)
    for t, logprobs in enumerate(result):
        token_id = token_ids[t]
        assert logprobs.token_id == token_id
        assert math.isclose(logprobs.logprob, reference[t, token_id].item(), abs_tol=1e-6)
        order = reference[t].argsort(descending=True).tolist()
        assert logprobs.rank == order.index(token_id) + 1
        assert [tid for tid, _ in logprobs.top] == order[:4]
        assert all(math.isclose(lp, reference[t, tid].item(), abs_tol=1e-6) for tid, lp in logprobs.top)


def test_compute_logprobs_ranks_ties_together_and_caps_top_at_vocab():
    result = compute_logprobs(torch.tensor([[1.0, 1.0, 0.0]]), [1], num_top=10)
    assert result[0].rank == 1 and len(result[0].top) == 3
    assert compute_logprobs(torch.tensor([[1.0, 1.0, 0.0]]), [2], num_top=0)[0] == Logprobs(
        token_id=2, logprob=pytest.approx(math.log(1 / (2 * math.e + 1))), rank=3, top=())


def test_sampled_logprobs_come_from_the_raw_distribution():
    logits = _random_logits(3, 40, seed=5)  # [B, V]
    states = [SamplingState.from_params(SamplingParams(seed=3, temperature=0.3, top_k=5, logprobs=2)),
              SamplingState(SamplingParams()),
              SamplingState(SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=0),
                            prompt_token_ids=[int(logits[2].argmax())])]
    out = sample(logits, states)
    assert out.logprobs[1] is None
    raw = torch.log_softmax(logits, dim=-1)  # [B, V]
    for row, num_top in ((0, 2), (2, 0)):
        logprobs = out.logprobs[row]
        assert logprobs.token_id == out.token_ids[row]
        assert math.isclose(logprobs.logprob, raw[row, out.token_ids[row]].item(), abs_tol=1e-6)
        assert len(logprobs.top) == num_top
    assert out.logprobs[0].top[0][0] == int(raw[0].argmax())


# --- boundary --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("logits", [torch.zeros(3, 4), torch.zeros(2, 4, dtype=torch.float16), torch.zeros(4)])
def test_rejects_logits_of_the_wrong_shape_or_dtype(logits):
    with pytest.raises(ValueError, match="logits must be"):
        sample(logits, _states(SamplingParams(), 2))
