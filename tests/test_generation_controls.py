"""Sampling controls, stop conditions and streaming of our generate (issue: generation controls)."""
import numpy as np
import pytest
from mindformers.generation.streamers import TextStreamer

from mindformers_ext import load_hf_model
from mindformers_ext.generation.sampling import top_k_filter, top_p_filter
from research.deepseek1_5 import DeepSeekCoderTokenizer


@pytest.fixture(scope="module")
def model(tiny_llama_dirs):
    return load_hf_model(tiny_llama_dirs["v1_5"], use_past=True)


PROMPTS = [[5, 17, 33, 8], [9, 4, 120, 61, 77, 3, 12]]


def test_sampling_is_reproducible_with_a_seed(model):
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, eos_token_id=[])
    first = model.generate(PROMPTS, seed=123, **kwargs)
    again = model.generate(PROMPTS, seed=123, **kwargs)
    other = model.generate(PROMPTS, seed=7, **kwargs)
    assert [a.tolist() for a in first] == [b.tolist() for b in again]
    assert [a.tolist() for a in first] != [b.tolist() for b in other]


def test_top_k_one_equals_greedy(model):
    greedy = model.generate(PROMPTS, max_new_tokens=12, do_sample=False, eos_token_id=[])
    sampled = model.generate(PROMPTS, max_new_tokens=12, do_sample=True, top_k=1, temperature=0.7, seed=1,
                             eos_token_id=[])
    assert [a.tolist() for a in greedy] == [b.tolist() for b in sampled]


def test_top_p_keeps_the_nucleus():
    """probs 0.5, 0.25, 0.15, 0.1: top_p 0.7 keeps {0.5, 0.25}; 0.75 keeps exactly those two too
    (cumulative 0.75 reaches p); 0.8 adds 0.15."""
    logits = np.log(np.array([[0.15, 0.5, 0.1, 0.25]], dtype=np.float32))
    kept = lambda p: set(np.flatnonzero(np.isfinite(top_p_filter(logits, p))[0]).tolist())  # noqa: E731
    assert kept(0.7) == {1, 3}
    assert kept(0.8) == {0, 1, 3}
    assert kept(0.3) == {1}
    assert set(np.flatnonzero(np.isfinite(top_k_filter(logits, 2))[0]).tolist()) == {1, 3}


def test_batch_rows_equal_single_prompt_runs_when_sampling_greedily(model):
    batch = model.generate(PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=[])
    for prompt, row in zip(PROMPTS, batch):
        assert model.generate([prompt], max_new_tokens=10, do_sample=False, eos_token_id=[])[0].tolist() == row.tolist()


def test_several_eos_ids_stop_each_row(model):
    free = model.generate(PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=[])
    stops = [int(free[0][len(PROMPTS[0]) + 2]), int(free[1][len(PROMPTS[1]) + 5])]
    got = model.generate(PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=stops)
    for prompt, full, row in zip(PROMPTS, free, got):
        new = full[len(prompt):].tolist()
        first = min(new.index(s) for s in stops if s in new)
        assert row.tolist() == prompt + new[:first + 1]


class _Collect(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.pieces = []

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)


def test_streamer_concatenates_to_the_full_text(model):
    tokenizer = DeepSeekCoderTokenizer()
    streamer = _Collect(tokenizer)
    out = model.generate([PROMPTS[1]], max_new_tokens=20, do_sample=False, eos_token_id=[], streamer=streamer)
    new_ids = out[0][len(PROMPTS[1]):].tolist()
    assert "".join(streamer.pieces) == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert len(streamer.pieces) > 1


def test_stop_strings_end_generation(model):
    tokenizer = DeepSeekCoderTokenizer()
    full = model.generate([PROMPTS[0]], max_new_tokens=12, do_sample=False, eos_token_id=[])[0]
    new = full[len(PROMPTS[0]):].tolist()
    target = tokenizer.decode(new[:4], skip_special_tokens=False)[-2:]
    got = model.generate([PROMPTS[0]], max_new_tokens=12, do_sample=False, eos_token_id=[],
                         stop_strings=[target], tokenizer=tokenizer)[0].tolist()
    got_new = got[len(PROMPTS[0]):]
    assert target in tokenizer.decode(got_new, skip_special_tokens=False)
    assert target not in tokenizer.decode(got_new[:-1], skip_special_tokens=False)
    assert got_new == new[:len(got_new)]
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.generate([PROMPTS[0]], max_new_tokens=2, stop_strings=["x"])


def test_bad_sampling_values_are_rejected(model):
    with pytest.raises(ValueError, match="top_p"):
        model.generate([PROMPTS[0]], max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([PROMPTS[0]], max_new_tokens=2, do_sample=True, temperature=0)


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
    dict(do_sample=True, temperature=1.6, top_k=0, top_p=1.0),  # explicit: the config default top_k is 50
    dict(do_sample=False, repetition_penalty=0.8),
])
def test_generate_scores_are_hf_processors_of_its_logits(model, kwargs):
    """generate's ``scores`` at every step equal HF's processors and warpers applied to its raw
    ``logits`` with the ids so far (so a dropped temperature or penalty shows), and each chosen token
    is allowed by them (the argmax when greedy)."""
    import torch
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if kwargs.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(kwargs["repetition_penalty"]))
    if kwargs["do_sample"]:
        processors.append(TemperatureLogitsWarper(kwargs["temperature"]))
        if kwargs.get("top_k"):
            processors.append(TopKLogitsWarper(kwargs["top_k"]))
        if kwargs.get("top_p", 1.0) < 1.0:
            processors.append(TopPLogitsWarper(kwargs["top_p"]))
    prompts = [PROMPTS[0], PROMPTS[0][:3] + [44]]  # one length: HF's histories are rectangular
    out = model.generate(prompts, max_new_tokens=10, eos_token_id=[], seed=5, return_dict_in_generate=True,
                         output_logits=True, output_scores=True, **kwargs)
    assert len(out["logits"]) == len(out["scores"]) == 10
    seqs = np.stack(out["sequences"])
    for step, (logits, scores) in enumerate(zip(out["logits"], out["scores"])):
        history = torch.tensor(seqs[:, :len(prompts[0]) + step], dtype=torch.long)
        expected = processors(history, torch.tensor(logits)).numpy()
        assert np.array_equal(np.isneginf(scores), np.isneginf(expected))
        finite = np.isfinite(expected)
        assert np.abs(scores[finite] - expected[finite]).max() <= 1e-6
        chosen = seqs[:, len(prompts[0]) + step]
        assert np.isfinite(expected[np.arange(len(prompts)), chosen]).all()
        if not kwargs["do_sample"]:
            assert (chosen == expected.argmax(-1)).all()
