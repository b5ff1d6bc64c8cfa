"""Sampling against its definition: HF's logits processors on the same inputs, and the empirical
distribution of many draws against the exact target by a chi-square test."""
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from mindformers_ext.generation.sampling import SamplingParams, draw, process_logits

VOCAB = 40


def _hf_scores(logits: np.ndarray, histories, params: SamplingParams) -> np.ndarray:
    """What HF's generate computes from the same logits: processors then warpers, in its order."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    ids = torch.tensor(np.asarray(histories), dtype=torch.long)
    return processors(ids, torch.tensor(logits)).numpy()


def _logits_with_ties(seed: int, batch: int = 6) -> np.ndarray:
    """Random logits where several values repeat within a row (ties at the top-k border)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(batch, VOCAB)).astype(np.float32)
    for row in logits:
        order = np.argsort(-row)
        row[order[3:6]] = row[order[3]]  # a three-way tie around rank 4
        row[order[10:12]] = row[order[10]]
        row[rng.integers(0, VOCAB, 4)] *= -1.0  # negative logits among the seen ids too
    return logits


CASES = [
    SamplingParams(do_sample=False, repetition_penalty=1.3),
    SamplingParams(do_sample=False, repetition_penalty=0.7),
    SamplingParams(do_sample=True, temperature=0.2),
    SamplingParams(do_sample=True, temperature=1.7, top_k=4),
    SamplingParams(do_sample=True, temperature=1.0, top_k=5),  # k ends inside the three-way tie
    SamplingParams(do_sample=True, temperature=0.7, top_p=0.8),  # ties inside the nucleus, not at its border
    SamplingParams(do_sample=True, temperature=1.3, top_k=12, top_p=0.6, repetition_penalty=1.2),
    SamplingParams(do_sample=True, temperature=1.0, top_p=0.05),  # keeps only the top token
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: repr(p).replace("SamplingParams", ""))
def test_scores_equal_hf_logits_processors(params):
    logits = _logits_with_ties(seed=1)
    rng = np.random.default_rng(2)
    histories = rng.integers(0, VOCAB, size=(logits.shape[0], 9)).tolist()
    ours = process_logits(logits, params, histories)
    expected = _hf_scores(logits, histories, params)
    assert np.array_equal(np.isneginf(ours), np.isneginf(expected)), "masked tokens differ from HF's"
    finite = np.isfinite(expected)
    assert np.abs(ours[finite] - expected[finite]).max() <= 1e-6


def test_top_p_keeps_every_token_tied_at_the_border():
    """Probabilities 0.4, 0.2, 0.2, 0.2 and p = 0.5: the nucleus ends inside the three-way tie. HF's
    unstable sort keeps some of the tied tokens; we keep all three (HF's choice is a subset of ours)."""
    logits = np.log(np.array([[0.2, 0.4, 0.2, 0.2]], dtype=np.float32))
    params = SamplingParams(do_sample=True, top_p=0.5)
    ours = set(np.flatnonzero(np.isfinite(process_logits(logits, params, [[]])[0])).tolist())
    hf = set(np.flatnonzero(np.isfinite(_hf_scores(logits, [[]], params)[0])).tolist())
    assert ours == {0, 1, 2, 3}
    assert 1 in hf and hf <= ours


def _target(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """softmax(logits / T) restricted to the k best and then to the smallest most-probable set whose
    mass reaches p, renormalised (written from the definition, in float64)."""
    scaled = logits.astype(np.float64) / temperature
    keep = np.ones_like(scaled, dtype=bool)
    if top_k:
        keep &= scaled >= np.sort(scaled)[-top_k]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        smallest = probs[order[mass_before < top_p]].min()
        probs = np.where(probs >= smallest, probs, 0.0)
        probs /= probs.sum()
    return probs


DRAWS = 20000


@pytest.mark.parametrize("temperature", [0.2, 1.0, 1.7])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 1.0), (0, 0.8), (10, 0.9)])
def test_draws_follow_the_target_distribution(temperature, top_k, top_p):
    """Chi-square of 20000 draws against the exact target (bins with expected count < 5 merged)."""
    logits = np.random.default_rng(3).normal(0.0, 1.5, size=VOCAB).astype(np.float32)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    tiled = np.tile(logits, (DRAWS, 1))
    ids = draw(process_logits(tiled, params, [[]] * DRAWS), params, np.random.default_rng(4))
    target = _target(logits, temperature, top_k, top_p)
    counts = np.bincount(ids, minlength=VOCAB).astype(np.float64)
    assert counts[target == 0].sum() == 0, "drew a token outside the top-k / top-p set"
    expected = target * DRAWS
    order = np.argsort(expected)
    small = expected[order].cumsum() < 5  # merge the rarest bins into one with expected >= 5
    merged_obs = np.concatenate([[counts[order][small].sum()], counts[order][~small]])
    merged_exp = np.concatenate([[expected[order][small].sum()], expected[order][~small]])
    if merged_exp[0] == 0:
        merged_obs, merged_exp = merged_obs[1:], merged_exp[1:]
    if len(merged_exp) < 2:  # a single possible token: every draw must be it
        assert counts[np.argmax(target)] == DRAWS
        return
    _, p_value = stats.chisquare(merged_obs, merged_exp)
    assert p_value > 1e-3, f"draws do not follow the target (p = {p_value:.2e})"


def test_chi_square_notices_a_wrong_temperature():
    """The test above has power: draws at T = 1.1 are rejected as samples of T = 1.0."""
    logits = np.random.default_rng(3).normal(0.0, 1.5, size=VOCAB).astype(np.float32)
    params = SamplingParams(do_sample=True, temperature=1.1)
    ids = draw(process_logits(np.tile(logits, (DRAWS, 1)), params, [[]] * DRAWS), params, np.random.default_rng(4))
    counts = np.bincount(ids, minlength=VOCAB)
    expected = _target(logits, 1.0, 0, 1.0) * DRAWS
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum())[1] < 1e-3


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    """OpenAI's definition, by hand: logit[j] -= frequency * count[j] + presence * (count[j] > 0), counted
    over the generated tokens (the prompt's are left to the repetition penalty), after that penalty."""
    logits = np.array([[1.0, -2.0, 3.0, 0.5, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    histories = [[0, 1, 4, 4, 2], [3]]  # prompt [0, 1], then generated [4, 4, 2]; prompt [3], nothing yet
    scores = process_logits(logits, params, histories, [[4, 4, 2], []])
    expected = np.array([[0.5, -4.0, 1.5 - 0.75, 0.5, 2.0 - 1.0], [1.0, 1.0, 1.0, 0.5, 1.0]], np.float32)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=-2.5).validate()


def test_logit_bias_is_added_to_the_raw_logits_first():
    """OpenAI's logit_bias: added to the model's logits before anything else (here before the repetition
    penalty, which then divides the biased positive logit)."""
    logits = np.array([[1.0, -2.0, 3.0]], np.float32)
    params = SamplingParams(repetition_penalty=2.0, logit_bias=((0, 5.0), (2, -10.0)))
    scores = process_logits(logits, params, [[0, 2]])
    np.testing.assert_allclose(scores, [[3.0, -2.0, -14.0]], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),)).validate()
