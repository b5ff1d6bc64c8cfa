"""Writing checkpoints in upstream MindFormers' layouts from HF state dicts (not a test module).

The rules below restate what upstream's converters did, as read in mindspore-lab/mindformers
(``research/deepseek2/convert_weight.py`` at v1.3.2 - v1.5.0, ``research/deepseek1_5/convert_weight.py``
at v1.5.0, ``research/wizardcoder/convert_weight.py`` at v1.5.0-beta2). They are written out here
independently of ``mindformers_ext/convert/maps`` so that the tests check our maps against upstream,
not against themselves.
"""
from __future__ import annotations

import re

import numpy as np

# DeepSeek-V2: upstream's name_replace(), in its order (v1.5.0; v1.3.2 lacks the q_proj line)
DS2_REPLACE = (
    ("embed_tokens.", "tok_embeddings."),
    (".self_attn.q_proj.", ".attention.q_proj."),
    (".self_attn.q_a_proj.", ".attention.q2l_proj."),
    (".self_attn.q_a_layernorm.", ".attention.lq_norm."),
    (".self_attn.q_b_proj.", ".attention.l2q_proj."),
    (".self_attn.kv_a_proj_with_mqa.", ".attention.kv2l."),
    (".self_attn.kv_a_layernorm.", ".attention.lkv_norm."),
    (".self_attn.kv_b_proj.", ".attention.lkv2kv."),
    (".self_attn.o_proj.", ".attention.wo."),
    ("mlp.gate_proj.", "feed_forward.w1."),
    ("mlp.down_proj.", "feed_forward.w2."),
    ("mlp.up_proj.", "feed_forward.w3."),
    ("mlp.experts.", "feed_forward.ffn."),
    ("mlp.shared_experts.gate_proj.", "feed_forward.shared_experts.w1."),
    ("mlp.shared_experts.down_proj.", "feed_forward.shared_experts.w2."),
    ("mlp.shared_experts.up_proj.", "feed_forward.shared_experts.w3."),
    ("mlp.gate.", "feed_forward.routed_experts.router.dense."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
)
# DeepSeek-Coder (Llama): upstream's name_replace() (v1.5.0)
LLAMA_REPLACE = (
    ("embed_tokens.", "tok_embeddings."), ("lm_head.", "output."), (".self_attn.q_proj.", ".attention.wq."),
    (".self_attn.k_proj.", ".attention.wk."), (".self_attn.v_proj.", ".attention.wv."),
    (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.down_proj.", ".feed_forward.w2."), (".mlp.up_proj.", ".feed_forward.w3."),
    (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
)
_FINAL = {"model.norm.weight": "model.norm_out.weight", "output.weight": "lm_head.weight",
          "model.tok_embeddings.weight": "model.tok_embeddings.embedding_weight"}


def _replace(name: str, rules) -> str:
    for old, new in rules:
        name = name.replace(old, new)
    return _FINAL.get(name, name)


def _np(value) -> np.ndarray:
    return value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value, dtype=np.float32)


def deepseek2_upstream_tensors(state: dict, gmm: bool = False, upstream_dtypes: bool = False) -> list:
    """``[(name, float32 array, dtype_name)]`` as upstream's DeepSeek-V2 converter writes them from an HF state
    dict: renamed, each MoE layer's experts stacked per projection under ``feed_forward.routed_experts.ffn``
    (``gmm``: then transposed (0, 2, 1), as upstream's ``--use_gmm`` step does), rope rows untouched.
    ``upstream_dtypes``: norms and the router float32, everything else bfloat16 (upstream's choice);
    else every tensor float32."""
    out, experts = [], {}
    for hf_name, value in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = _replace(hf_name, DS2_REPLACE)
        match = re.match(r"(.*\.feed_forward\.)ffn\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$", name)
        if match:
            experts.setdefault(match.group(1), {}).setdefault(match.group(3), {})[int(match.group(2))] = _np(value)
            continue
        keep32 = "norm" in name or "dense" in name
        out.append((name, _np(value), "float32" if keep32 or not upstream_dtypes else "bfloat16"))
    for front, projections in experts.items():
        for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            stacked = np.stack([projections[proj][j] for j in range(len(projections[proj]))], 0)
            if gmm:
                stacked = np.ascontiguousarray(stacked.transpose(0, 2, 1))
            out.append((f"{front}routed_experts.ffn.{w}.weight", stacked,
                        "bfloat16" if upstream_dtypes else "float32"))
    return out


def deepseek2_mla_split(tensors: list, heads: int, nope: int, rope: int, v_dim: int) -> list:
    """Upstream v1.5.0's ``mla_weight_split`` (positional flag + ``--pre_ckpt_path``) applied to
    :func:`deepseek2_upstream_tensors`' output: ``l2q_proj`` -> ``l2q_nope_proj`` / ``l2q_pe_proj`` (each
    head's rope rows de-interleaved: even rows, then odd), ``kv2l`` -> ``kv2l_latent_kv`` / ``kv2l_k_pe``
    (de-interleaved), ``lkv2kv`` -> ``lkv2kv_k_nope`` / ``lkv2kv_v``; other tensors unchanged."""
    out = []
    for name, value, dtype in tensors:
        if ".attention.l2q_proj." in name:
            per_head = value.reshape(heads, nope + rope, -1)
            pe = per_head[:, nope:].reshape(heads, rope // 2, 2, -1).transpose(0, 2, 1, 3)
            out.append((name.replace(".l2q_proj.", ".l2q_nope_proj."), per_head[:, :nope].reshape(heads * nope, -1),
                        dtype))
            out.append((name.replace(".l2q_proj.", ".l2q_pe_proj."), pe.reshape(heads * rope, -1), dtype))
        elif ".attention.kv2l." in name:
            latent = value.shape[0] - rope
            k_pe = value[latent:].reshape(rope // 2, 2, -1).transpose(1, 0, 2).reshape(rope, -1)
            out.append((name.replace(".kv2l.", ".kv2l_k_pe."), np.ascontiguousarray(k_pe), dtype))
            out.append((name.replace(".kv2l.", ".kv2l_latent_kv."), np.ascontiguousarray(value[:latent]), dtype))
        elif ".attention.lkv2kv." in name:
            per_head = value.reshape(heads, nope + v_dim, -1)
            out.append((name.replace(".lkv2kv.", ".lkv2kv_k_nope."), per_head[:, :nope].reshape(heads * nope, -1),
                        dtype))
            out.append((name.replace(".lkv2kv.", ".lkv2kv_v."), per_head[:, nope:].reshape(heads * v_dim, -1), dtype))
        else:
            out.append((name, value, dtype))
    return [(n, np.ascontiguousarray(v), d) for n, v, d in out]


def llama_upstream_tensors(state: dict) -> list:
    """As upstream's DeepSeek-Coder converter writes an HF Llama state dict (float32 here)."""
    return [(_replace(k, LLAMA_REPLACE), _np(v), "float32") for k, v in state.items()
            if not k.endswith("rotary_emb.inv_freq")]


# WizardCoder (v1.5.0-beta2 convert_weight.py): per-layer and additional name lists, zipped in order
WIZ_MS = ("layernorm1.gamma", "layernorm1.beta", "layernorm2.gamma", "layernorm2.beta", "attention.projection.weight",
          "attention.projection.bias", "attention.dense1.weight", "attention.dense1.bias", "attention.dense2.weight",
          "attention.dense2.bias", "attention.dense3.weight", "attention.dense3.bias", "output.mapping.weight",
          "output.mapping.bias", "output.projection.weight", "output.projection.bias")
WIZ_PT = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.weight", "attn.c_proj.bias",
          "attn.c_attn.weight.q", "attn.c_attn.bias.q", "attn.c_attn.weight.k", "attn.c_attn.bias.k",
          "attn.c_attn.weight.v", "attn.c_attn.bias.v", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
          "mlp.c_proj.bias")
WIZ_ADD_MS = ("backbone.layernorm.gamma", "backbone.layernorm.beta",
              "backbone.embedding.word_embedding.embedding_table",
              "backbone.embedding.position_embedding.embedding_table", "head.head_weight")
WIZ_ADD_PT = ("transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.wte.weight", "transformer.wpe.weight",
              "lm_head.weight")


def wizardcoder_upstream_tensors(state: dict, n_embd: int, head_dim: int, layers: int) -> list:
    """As upstream's WizardCoder converter writes an HF GPT-BigCode (multi-query) state dict: ``c_attn``
    split into q / k / v at [n_embd, n_embd + head_dim] (upstream hard-coded 6144 / 6272 for 15B), every
    ``c_proj`` / ``c_fc`` weight transposed, names from its lists; ``head.head_weight`` = ``lm_head.weight``."""
    state = {k: _np(v) for k, v in state.items()}
    for name in [k for k in state if k.endswith(("attn.c_attn.weight", "attn.c_attn.bias"))]:
        q, k, v = np.split(state.pop(name), [n_embd, n_embd + head_dim], 0)
        state[name + ".q"], state[name + ".k"], state[name + ".v"] = q, k, v
    pairs = [(f"backbone.blocks.{i}.{ms}", f"transformer.h.{i}.{pt}")
             for i in range(layers) for ms, pt in zip(WIZ_MS, WIZ_PT)] + list(zip(WIZ_ADD_MS, WIZ_ADD_PT))
    out = []
    for ms_name, pt_name in pairs:
        value = state[pt_name]
        if pt_name.endswith("weight") and ("c_proj" in pt_name or "c_fc" in pt_name):
            value = np.ascontiguousarray(value.T)
        out.append((ms_name, value, "float32"))
    return out


def save_ms_checkpoint(tensors: list, path: str) -> str:
    """Write ``[(name, array, dtype_name)]`` with ``mindspore.save_checkpoint`` (as upstream did)."""
    import mindspore as ms

    dtypes = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16, "int32": ms.int32}
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a, dtype=dtypes[d])} for n, a, d in tensors], path)
    return path


# run_mindformer.py with the two hooks that issue 13 asks of mindformers_ext/runner/config.py (translate the
# YAML after the command-line overrides) and mindformers_ext/checkpoint.py (fall back to the upstream
# layout), installed by patching when the files do not have them yet. Written to a file and run as a script.
HOOKED_RUN = '''
import sys

from mindformers_ext import checkpoint
from mindformers_ext.convert import upstream
from mindformers_ext.runner import config
from mindformers_ext.upstream import translate_config

_apply_overrides, _load_into = config.apply_overrides, checkpoint.load_checkpoint_into


def apply_overrides(raw, overrides, source="command line"):
    _apply_overrides(raw, overrides, source)
    translate_config(raw, source)


def load_checkpoint_into(network, path, rank_id=None, what="load_checkpoint"):
    try:
        return _load_into(network, path, rank_id, what)
    except checkpoint.CheckpointError:
        files = upstream.upstream_candidate(path, network, rank_id)
        if files is None:
            raise
        return upstream.load_upstream_into(network, files, what)


config.apply_overrides, checkpoint.load_checkpoint_into = apply_overrides, load_checkpoint_into
from mindformers_ext.runner.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''


def runner_has_upstream_hooks() -> bool:
    """True once the runner translates upstream YAMLs and the checkpoint loader maps upstream layouts."""
    import inspect

    from mindformers_ext import checkpoint
    from mindformers_ext.runner import config

    return ("translate_config" in inspect.getsource(config.build_config)
            and "upstream" in inspect.getsource(checkpoint.load_checkpoint_into))
