"""Reduced precision: the dtypes of our 7B / 15B / 236B YAMLs on tiny models, against HF in the same dtype.

Every shipped YAML runs ``compute_dtype: bfloat16`` with ``layernorm_compute_type``,
``softmax_compute_type`` (and ``rotary_dtype`` / ``router_dense_type``) at float32; parameters are
bfloat16 (DeepSeek-Coder-7B predict, DeepSeek-V2 236B / Lite) or float32 (DeepSeek-Coder-7B
finetune, WizardCoder-15B). Each YAML's settings are read from the file and run twice: as written
(bfloat16) and with every bfloat16 replaced by float16 (MindFormers' other half type).

Reference: HF transformers with ``dtype=`` that half type and eager attention, which is the same
mixed scheme: matmuls in half (accumulated in float32 by torch's CPU kernels, as MindSpore's),
RMSNorm / LayerNorm statistics in float32, softmax in float32 (``softmax(..., dtype=float32)``),
rotary tables in float32, DeepSeek's router in float32. Both sides load one half checkpoint (the
sharp tiny model of ``sharp_models.sharpen`` converted to half and saved to a tmp dir), so float32
parameters hold exactly the half values HF holds.

Tolerance (max abs logit difference; the logits here have std ~1, max |logit| ~4): two correct half
implementations differ by their rounding orders, so ours may be OWN_ERROR (float16 0.05, bfloat16
0.4: 8x, bfloat16 keeps 3 fewer mantissa bits) plus HF's own half error away from HF's half run,
HF's error being measured on the same inputs as HF half vs HF float32 on the same (half-valued)
weights. Measured in float16: ours vs HF 0.009-0.018 on the dense models, where HF float16 is
0.008-0.016 from float32; DeepSeek-V2 0.006-0.084, where HF float16 itself is up to 0.077 from
float32 at a sensitive position (sharp attention and routing amplify half rounding) while ours is
0.017 from float32 there. A broken path (NaN, a lost cast, a missing scale) is far outside.

Near-ties are excluded deterministically, because which side of a tie half rounding lands on says
nothing about the implementation:

* greedy: 16 new tokens with our KV cache (``use_past=True``) must equal HF ``generate`` greedy.
  Of 128 seeded random 8-token prompts, :func:`_pick_prompt` takes one whose HF half run has a
  top-1 / top-2 logit gap above OWN_ERROR at every step (measured: without that, a DeepSeek-V2-Lite
  run diverged at step 2 on a gap of 0.002 while the step logits agreed to 0.005);
* MoE routing (DeepSeek-V2): a token whose k-th and (k+1)-th expert (or kept / dropped group) are
  within half-rounding noise of each other picks its experts by rounding order, and one flipped
  expert moves the logits by ~0.6. HF float16's router logits are up to 0.04 (median 0.009) from
  float32's; with 2 MoE layers most 24-token sequences hold such a tie, so prompts and logits rows
  are the candidates with the largest smallest routing margin (:func:`router_margins`, at least
  ROUTER_MARGIN = 0.03 router-logit units).

Rounding noise hides a layer that computes in a wider type than asked, so the dtypes themselves are
checked too: the decoder's hidden states are in compute_dtype and the parameters in param_init_type
(Llama and DeepSeek-V2 used to keep a float32 residual stream under float32 parameters), and a
float16 softmax survives the fully masked rows of left padding (MASK_VALUE used to become -inf).

MindSpore 2.9's CPU backend has no bfloat16 kernel for MatMul, BatchMatMul, Reshape, Gather,
Softmax and most other ops ("Select CPU operator[MatMul] fail! Unsupported data type!"), so the
bfloat16 cases are probed and skipped on CPU with that reason; float16 runs on CPU.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

import mindspore as ms
from mindspore import Tensor, nn, ops

from conftest import make_tiny_llama
from deepseek2_reference import make_tiny_deepseek2, one_torch_thread
from mindformers_ext import load_hf_model
from mindformers_ext.layers import GroupedAttentionCore, MASK_VALUE
from wizardcoder_util import REPO, make_tiny_bigcode

OWN_ERROR = {"float16": 0.05, "bfloat16": 0.4}
NEW_TOKENS = 16
PROMPT_LEN = 8
CANDIDATES = 128
ROUTER_MARGIN = 0.03
TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_KEYS = ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type",
              "rotary_dtype", "router_dense_type")

# name: (tiny HF family, YAML whose precision settings it runs)
CONFIGS = {
    "deepseek-coder-7b-predict": ("llama", "research/deepseek1_5/predict_deepseek_coder1_5_7b.yaml"),
    "deepseek-coder-7b-finetune": ("llama", "research/deepseek1_5/finetune_deepseek_coder1_5_7b.yaml"),
    "wizardcoder-15b": ("gpt_bigcode", "research/wizardcoder/run_wizardcoder.yaml"),
    "deepseek-v2-236b": ("deepseek2_full", "research/deepseek2/predict_deepseek2_236B.yaml"),
    "deepseek-v2-lite": ("deepseek2_lite", "research/deepseek2/predict_deepseek2_lite.yaml"),
}
SLOW = ("deepseek-v2-lite",)  # same precision settings as 236B, V2-Lite's structure: -m slow
CASES = [pytest.param(name, dtype, marks=[pytest.mark.slow] if name in SLOW else [], id=f"{name}-{dtype}")
         for name in CONFIGS for dtype in ("float16", "bfloat16")]


def yaml_precision(path: str, half: str) -> dict:
    """The YAML's dtype settings, with its bfloat16 replaced by ``half``."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        model_config = yaml.safe_load(f)["model"]["model_config"]
    found = {k: model_config[k] for k in DTYPE_KEYS if k in model_config}
    assert found["compute_dtype"] == "bfloat16", f"{path}: the shipped YAMLs compute in bfloat16"
    return {k: half if v == "bfloat16" else v for k, v in found.items()}


class _KernelProbe(nn.Cell):
    """The op kinds every model needs: (batch) matmul, reshape, gather, softmax."""

    def construct(self, x, table, ids):
        h = ops.Gather()(table, ids, 0)
        y = ops.MatMul(transpose_b=True)(h, x)
        y = ops.BatchMatMul()(ops.reshape(y, (1, 4, 4)), ops.reshape(x, (1, 4, 4)))
        return ops.cast(ops.Softmax(-1)(y), ms.float32)


_PROBED: dict = {}


def missing_kernel(dtype: str):
    """None when this MindSpore backend runs the probe graph in ``dtype``, else the reason it cannot."""
    if dtype not in _PROBED:
        msdt = {"float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]
        x = Tensor(np.eye(4, dtype=np.float32)).astype(msdt)
        try:
            _KernelProbe()(x, x, Tensor(np.arange(4, dtype=np.int32))).asnumpy()
            _PROBED[dtype] = None
        except (RuntimeError, TypeError, ValueError) as err:
            lines = [line.strip(" -") for line in str(err).splitlines() if "fail" in line or "Unsupported" in line]
            detail = " ".join(lines[:2])[:200] or str(err).splitlines()[0][:200]
            _PROBED[dtype] = (f"MindSpore {ms.__version__} on {ms.get_context('device_target')} has no {dtype} "
                              f"kernel for the ops our models use ({detail}); {dtype} needs a backend with "
                              f"{dtype} kernels (Ascend)")
    return _PROBED[dtype]


def _make_hf(family: str, path: str) -> None:
    if family == "llama":
        make_tiny_llama(path, seed=0)
    elif family == "gpt_bigcode":
        make_tiny_bigcode(path, seed=0)
    else:
        make_tiny_deepseek2(path, family.split("_")[1], seed=0)


class _Hidden(nn.Cell):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def construct(self, ids, pos, mask):
        return self.lm.model(ids, pos, mask)[0]


class Built:
    """Our model in a YAML's precision and the HF half reference on the same half checkpoint."""

    def __init__(self, root, name: str, dtype: str) -> None:
        import transformers

        family, yaml_path = CONFIGS[name]
        self.name, self.dtype, self.tol = name, dtype, OWN_ERROR[dtype]
        self.precision = yaml_precision(yaml_path, dtype)
        fp32_dir, half_dir = str(root / family), str(root / f"{family}_{dtype}")
        if not os.path.exists(os.path.join(fp32_dir, "config.json")):
            _make_hf(family, fp32_dir)
        auto = transformers.AutoModelForCausalLM
        if not os.path.exists(os.path.join(half_dir, "config.json")):
            auto.from_pretrained(fp32_dir, dtype=TORCH_DTYPE[dtype]).save_pretrained(half_dir, safe_serialization=True)
        self.hf = auto.from_pretrained(half_dir, dtype=TORCH_DTYPE[dtype], attn_implementation="eager").eval()
        # HF float32 on the same (half-valued) weights: the rounding noise of HF's own half run
        self.hf32 = auto.from_pretrained(half_dir, dtype=torch.float32, attn_implementation="eager").eval()
        overrides = {k: v for k, v in self.precision.items() if k != "compute_dtype"}
        self.ours = load_hf_model(half_dir, use_past=True, dtype=self.precision["compute_dtype"], **overrides)
        self.vocab = self.ours.config.vocab_size

    def hf_logits(self, ids: np.ndarray, model=None) -> np.ndarray:
        with torch.no_grad(), one_torch_thread():
            return (model or self.hf)(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(name, dtype)`` -> :class:`Built`, each built once for the module (skips without kernels)."""
    root = tmp_path_factory.mktemp("reduced_precision")
    cache: dict = {}

    def get(name: str, dtype: str) -> Built:
        reason = missing_kernel(dtype)
        if reason:
            pytest.skip(reason)
        if (name, dtype) not in cache:
            cache[(name, dtype)] = Built(root, name, dtype)
        return cache[(name, dtype)]
    return get


def router_margins(hf, ids) -> np.ndarray:
    """Per row of ``ids``, the smallest routing margin of HF's MoE layers (inf for dense models).

    A margin is the router-logit gap (float32, as DeepSeek's gate computes it) at a routing decision:
    between the ``topk_group``-th and the next group (group-limited routing) and between the k-th and
    the next expert among the kept groups. Softmax keeps the order, so the gap is in logit units.
    """
    cfg, logits = hf.config, []
    gates = [m for n, m in hf.named_modules() if n.endswith("mlp.gate")]
    hooks = [g.register_forward_hook(
        lambda mod, inp, out: logits.append(torch.nn.functional.linear(inp[0].float(), mod.weight.float())))
        for g in gates]
    try:
        with torch.no_grad(), one_torch_thread():
            hf(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    if not logits:
        return np.full(len(ids), np.inf)
    lg = torch.stack(logits).numpy()  # (moe layers, batch, seq, experts)
    margin = np.full(lg.shape[:-1], np.inf)
    if cfg.topk_method == "group_limited_greedy":
        per = lg.shape[-1] // cfg.n_group
        grouped = lg.reshape(*lg.shape[:-1], cfg.n_group, per)
        best = np.sort(grouped.max(-1), -1)
        margin = best[..., -cfg.topk_group] - best[..., -cfg.topk_group - 1]
        dropped = np.argsort(-grouped.max(-1), -1)[..., cfg.topk_group:]
        np.put_along_axis(grouped, dropped[..., None], -np.inf, axis=-2)
        lg = grouped.reshape(lg.shape)
    top = np.sort(lg, -1)
    k = cfg.num_experts_per_tok
    return np.minimum(margin, top[..., -k] - top[..., -k - 1]).min(axis=(0, 2))


def _pick_rows(built: Built, count: int = 2, length: int = 24) -> np.ndarray:
    """``count`` of 128 seeded random rows, those with the largest routing margins (MoE), else the first."""
    ids = np.random.RandomState(5).randint(3, built.vocab, size=(CANDIDATES, length))
    margins = router_margins(built.hf, ids)
    rows = np.argsort(-margins, kind="stable")[:count]
    assert margins[rows].min() > ROUTER_MARGIN, f"{built.name}: routing near-ties in every candidate row"
    return ids[rows].astype(np.int32)


def _pick_prompt(built: Built):
    """(prompt, HF ids, HF step logits) of the candidate prompt without near-ties on HF's greedy path:
    every step's top-1 / top-2 logit gap above the tolerance, and (MoE) the largest routing margin
    over prompt and continuation, which must exceed ROUTER_MARGIN."""
    rng = np.random.RandomState(11)
    ids = torch.tensor(rng.randint(3, built.vocab, size=(CANDIDATES, PROMPT_LEN)), dtype=torch.long)
    with torch.no_grad(), one_torch_thread():
        out = built.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1).float().numpy()  # (candidates, steps, vocab)
    top2 = np.sort(logits, -1)[..., -2:]
    gaps = (top2[..., 1] - top2[..., 0]).min(-1)
    margins = np.where(gaps > built.tol, router_margins(built.hf, out.sequences.numpy()), -np.inf)
    row = int(np.argmax(margins))  # the first of the best: deterministic
    assert margins[row] > ROUTER_MARGIN, (f"{built.name}: no candidate prompt without a near-tie (largest min "
                                          f"top-2 gap {gaps.max():.3f})")
    return ids[row].tolist(), out.sequences[row, PROMPT_LEN:].tolist(), logits[row]


@pytest.mark.parametrize("name, dtype", CASES)
def test_logits_match_hf_in_the_same_dtype(build, name, dtype):
    """Full-sequence logits (no cache; 2 x 24 random tokens, without routing near-ties) within the
    tolerance of HF's half run."""
    built = build(name, dtype)
    ids = _pick_rows(built)
    ours = built.ours(Tensor(ids)).asnumpy()
    expected = built.hf_logits(ids)
    noise = float(np.abs(expected - built.hf_logits(ids, built.hf32)).max())
    error = float(np.abs(ours - expected).max())
    print(f"\n{name} {dtype} {built.precision}: logits max abs vs HF {error:.4f} "
          f"(HF {dtype} vs HF float32: {noise:.4f}; allowed {built.tol} + {noise:.4f})")
    assert np.isfinite(ours).all()
    assert error <= built.tol + noise, \
        f"{name} {dtype}: max abs logit difference {error:.4f} > {built.tol} + {noise:.4f}"


@pytest.mark.parametrize("name, dtype", CASES)
def test_cached_greedy_matches_hf_generate(build, name, dtype):
    """16 greedy tokens with our KV cache (in the compute dtype) equal HF's, and every decode step's
    logits are within the tolerance of HF's (prompt without near-ties, see the module docstring)."""
    built = build(name, dtype)
    prompt, expected_ids, expected_logits = _pick_prompt(built)
    out = built.ours.generate([prompt], max_new_tokens=NEW_TOKENS, do_sample=False, use_past=True, eos_token_id=[],
                              return_dict_in_generate=True, output_logits=True)
    got = out["sequences"][0].tolist()[PROMPT_LEN:]
    logits = np.stack(out["logits"])[:, 0]
    agree = next((i for i, (a, b) in enumerate(zip(got, expected_ids)) if a != b), NEW_TOKENS)
    error = float(np.abs(logits[:agree + 1] - expected_logits[:agree + 1]).max())
    teacher = np.array([prompt + expected_ids[:-1]])
    noise = float(np.abs(expected_logits - built.hf_logits(teacher, built.hf32)[0, PROMPT_LEN - 1:]).max())
    print(f"\n{name} {dtype}: greedy {agree}/{NEW_TOKENS} tokens equal, step logits max abs vs HF {error:.4f} "
          f"(HF {dtype} vs HF float32: {noise:.4f})")
    assert got == expected_ids
    assert error <= built.tol + noise, \
        f"{name} {dtype}: decode-step logit difference {error:.4f} > {built.tol} + {noise:.4f}"


@pytest.mark.parametrize("name, dtype", CASES)
def test_residual_stream_runs_in_the_compute_dtype(build, name, dtype):
    """The decoder's hidden states are in compute_dtype also where parameters are float32 (the
    embedding output is cast, as in MindFormers; HF half runs the residual in half too)."""
    built = build(name, dtype)
    seq = 5
    ids = Tensor(np.arange(3, 3 + seq, dtype=np.int32)[None])
    pos = Tensor(np.arange(seq, dtype=np.int32)[None])
    mask = Tensor(np.where(np.tril(np.ones((seq, seq), bool)), 0.0, MASK_VALUE).astype(np.float32)[None, None])
    hidden = _Hidden(built.ours)(ids, pos, mask)
    assert hidden.dtype == {"float16": ms.float16, "bfloat16": ms.bfloat16}[built.precision["compute_dtype"]]
    params = {p.dtype for p in built.ours.get_parameters()}
    assert params == {{"float32": ms.float32, "float16": ms.float16,
                       "bfloat16": ms.bfloat16}[built.precision["param_init_type"]]}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_softmax_survives_fully_masked_rows(dtype):
    """softmax_compute_type half with a row whose keys are all masked (the padding of a left-padded
    prompt in prefill): MASK_VALUE (-1e9) is -inf in float16, which made that row NaN and, through
    its keys / values, every row of the batch. The other rows equal the float32-softmax core's."""
    reason = missing_kernel(dtype)
    if reason:
        pytest.skip(reason)
    msdt = {"float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]
    rng = np.random.RandomState(0)
    q = Tensor(rng.randn(1, 3, 2, 8).astype(np.float32)).astype(msdt)
    k = Tensor(rng.randn(1, 2, 3, 8).astype(np.float32)).astype(msdt)
    v = Tensor(rng.randn(1, 2, 3, 8).astype(np.float32)).astype(msdt)
    valid = np.array([False, True, True])
    allowed = np.tril(np.ones((3, 3), bool)) & valid[None, :]
    mask = Tensor(np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[None, None])
    half = GroupedAttentionCore(2, 2, 8, 8, 8 ** -0.5, dtype)(q, k, v, mask).astype(ms.float32).asnumpy()
    full = GroupedAttentionCore(2, 2, 8, 8, 8 ** -0.5, "float32")(q, k, v, mask).astype(ms.float32).asnumpy()
    assert np.isfinite(half).all()
    assert np.abs(half[:, 1:] - full[:, 1:]).max() <= OWN_ERROR[dtype]
