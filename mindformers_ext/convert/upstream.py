"""Checkpoints written by upstream MindFormers (tags v1.3.2 - v1.5.0): detect, migrate, or load on the fly.

Their layouts are the ``UPSTREAM_MAP`` s of ``maps/*.py``. :func:`detect_upstream` tells the layout from tensor
names; :func:`convert_upstream` migrates a file once (``tools/convert_weight.py --upstream``);
:func:`load_upstream_into` maps one into a built network while loading, with the converter's checks. Optimizer
state saved beside the weights is skipped; one rank's part of a model-parallel save is refused with how to
merge the ranks first.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from mindformers_ext.convert.engine import ConversionResult, convert, mindspore_arrays, plan_for
from mindformers_ext.convert.sources import WeightSource, open_source
from mindformers_ext.convert.tensors import ConversionError, TensorEntry
from mindformers_ext.convert.weight_map import (BUILTIN_MAPS, UPSTREAM_SUFFIX, WeightMap, check_map_config,
                                                get_weight_map, hf_shapes, load_config)

_FAMILY_TITLE = {"deepseek2": "DeepSeek-V2", "wizardcoder": "WizardCoder", "llama": "DeepSeek-Coder (Llama)"}
# what the on-the-fly mapping changes, for the log line
_WHAT = {"deepseek2": "MoE names, rope-row order", "wizardcoder": "names, q/k/v split, transposed projections",
         "llama": "nothing (same names)"}
_STATE_PREFIXES = ("adam_m.", "adam_v.", "moments.", "moment1.", "moment2.", "accu_grads.", "accumulated_grads.",
                   "exp_avg.", "exp_avg_sq.")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# shipped YAMLs tried (in order) when no config is given: the released sizes of each family
DEFAULT_CONFIGS = {
    "deepseek2": ("research/deepseek2/predict_deepseek2_236B.yaml", "research/deepseek2/predict_deepseek2_lite.yaml"),
    "wizardcoder": ("research/wizardcoder/run_wizardcoder.yaml",),
    "llama": ("research/deepseek1_5/predict_deepseek_coder1_5_7b.yaml",),
}
_LLAMA_PRESETS = ("deepseek-coder-1.3b", "deepseek-coder-6.7b", "deepseek-coder-33b")


def _model_names(names: Iterable[str]) -> list[str]:
    return [n for n in names if "." in n and not n.startswith(_STATE_PREFIXES)]


def detect_upstream(names: Iterable[str]) -> Optional[str]:
    """``'deepseek2'`` / ``'wizardcoder'`` when a checkpoint's tensor ``names`` are in upstream's layout of that
    family, else None. Upstream's DeepSeek-Coder checkpoints have our names (they need no mapping)."""
    for name in _model_names(names):
        if name.startswith(("backbone.blocks.", "backbone.embedding.")) or name == "head.head_weight":
            return "wizardcoder"
        if ".feed_forward.routed_experts." in name:
            return "deepseek2"
    return None


def family_of_model(network_or_config: Any) -> str:
    """``'deepseek2'``, ``'wizardcoder'`` or ``'llama'`` for one of our networks or configs."""
    config = getattr(network_or_config, "config", network_or_config)
    if hasattr(config, "kv_lora_rank"):
        return "deepseek2"
    if hasattr(config, "multi_query"):
        return "wizardcoder"
    return "llama"


def _family(model: str) -> str:
    model = model[:-len(UPSTREAM_SUFFIX)] if model.endswith(UPSTREAM_SUFFIX) else model
    if model not in BUILTIN_MAPS:
        raise ConversionError(f"--upstream: unknown --model {model!r}; expected one of {sorted(BUILTIN_MAPS)}")
    return BUILTIN_MAPS[model]


def upstream_weight_map(family: str, entries: Sequence[TensorEntry] = (),
                        hidden_size: Optional[int] = None) -> WeightMap:
    """The upstream map of ``family``; for DeepSeek-V2 the variant for ``entries``: grouped-matmul when the
    stacked experts are stored (E, hidden, inter), MLA-split when the attention is v1.5.0's split tensors."""
    wmap = get_weight_map(family + UPSTREAM_SUFFIX)
    if family != "deepseek2" or not entries:
        return wmap
    from mindformers_ext.convert.maps.deepseek2 import UPSTREAM_VARIANTS  # pylint: disable=C0415

    if hidden_size is None:
        embedding = [e for e in entries if e.name == "model.tok_embeddings.embedding_weight"]
        hidden_size = embedding[0].shape[1] if embedding else None
    gmm = False
    for entry in entries:
        if entry.name.endswith(".feed_forward.routed_experts.ffn.w1.weight") and len(entry.shape) == 3:
            _, rows, cols = entry.shape
            gmm = hidden_size is not None and rows == hidden_size and cols != hidden_size
            break
    split = any(e.name.endswith((".attention.kv2l_latent_kv.weight", ".attention.l2q_nope_proj.weight",
                                 ".attention.lkv2kv_k_nope.weight")) for e in entries)
    return UPSTREAM_VARIANTS[(gmm, split)]


def _config_value(config: Any, wmap: WeightMap) -> Any:
    return load_config(config, wmap, upstream=True) if isinstance(config, (str, os.PathLike)) else config


def _shapes_fit(wmap: WeightMap, config: Any, entries: Sequence[TensorEntry]) -> Optional[str]:
    """None when the source's tensors fit ``config`` under ``wmap``, else why not."""
    try:
        plan_for(WeightSource("probe", lambda: list(entries)), wmap, config, "ours")
    except (ConversionError, KeyError, TypeError, ValueError) as exc:
        return str(exc)
    return None


def resolve_config(family: str, wmap: WeightMap, entries: Sequence[TensorEntry], config: Any = None,
                   source: str = "") -> Any:
    """``config`` (a path or a config), else the first of the family's shipped sizes the checkpoint fits."""
    if config is not None:
        return _config_value(config, wmap)
    tried = []
    candidates: list[tuple[str, Any]] = [(p, os.path.join(REPO, p)) for p in DEFAULT_CONFIGS[family]]
    if family == "llama":
        from mindformers_ext.families import family_for_weight_map  # pylint: disable=import-outside-toplevel
        config_class = family_for_weight_map("deepseek").config_class
        candidates += [(p, config_class.from_preset(p)) for p in _LLAMA_PRESETS]
    for label, candidate in candidates:
        value = _config_value(candidate, wmap)
        why = _shapes_fit(wmap, value, entries)
        if why is None:
            return value
        tried.append(f"{label}: {why.split(': ', 1)[-1]}")
    raise ConversionError(f"{source}: an upstream {_FAMILY_TITLE[family]} checkpoint whose shapes match none of the "
                          "released sizes; pass --config (the YAML the checkpoint was trained with, upstream's or "
                          "ours, or the HF config.json). Tried:\n  " + "\n  ".join(tried))


def plan_upstream(source: WeightSource, family: str, config: Any = None, dtype: Optional[str] = None):
    """``(plan, weight_map)`` converting an upstream checkpoint of ``family`` to our names."""
    entries = source.entries()
    found = detect_upstream(e.name for e in entries)
    if family != "llama":
        if found is None:
            sample = ", ".join(repr(n) for n in _model_names(e.name for e in entries)[:4])
            ours = {"deepseek2": ".feed_forward.router.dense.weight", "wizardcoder": "model.layers."}[family]
            hint = (" It already has our names: load it as it is." if any(ours in e.name for e in entries)
                    else "")
            raise ConversionError(f"{source.path}: not an upstream MindFormers {_FAMILY_TITLE[family]} checkpoint (no "
                                  f"names like {_example(family)}; it holds {sample}, ...).{hint}")
        if found != family:
            raise ConversionError(f"{source.path}: an upstream {_FAMILY_TITLE[found]} checkpoint, not "
                                  f"{_FAMILY_TITLE[family]} (wrong --model?)")
    elif found is not None:
        raise ConversionError(f"{source.path}: an upstream {_FAMILY_TITLE[found]} checkpoint, not "
                              f"{_FAMILY_TITLE[family]} (wrong --model?)")
    wmap = upstream_weight_map(family, entries)
    cfg = resolve_config(family, wmap, entries, config, source.path)
    try:
        return plan_for(WeightSource(source.path, lambda: list(entries)), wmap, cfg, "ours", dtype), wmap, cfg
    except ConversionError as exc:
        hint = _shard_hint(wmap, cfg, entries, source.path)
        if hint:
            raise ConversionError(hint) from exc
        raise


def _shard_hint(wmap: WeightMap, config: Any, entries: Sequence[TensorEntry], path: str) -> Optional[str]:
    """Why a checkpoint whose tensors are the config's, each cut along one axis into the same number of parts,
    is one rank's part of a distributed save; None when its shapes differ otherwise."""
    try:
        hf_cfg = check_map_config(wmap, config)
        expected = hf_shapes(wmap.for_config(hf_cfg), hf_cfg)
    except (ConversionError, KeyError, TypeError, ValueError):
        return None
    factors, example = set(), None
    for entry in entries:
        want = expected.get(entry.name)
        got = tuple(entry.shape)
        if want is None or got == tuple(want):
            continue
        diff = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if len(got) != len(want) or len(diff) != 1 or got[diff[0]] == 0 or want[diff[0]] % got[diff[0]]:
            return None
        factors.add(want[diff[0]] // got[diff[0]])
        example = example or (entry.name, got, tuple(want))
    if len(factors) != 1 or example is None:
        return None
    name, got, want = example
    return (f"{path}: one rank's part of a distributed (model-parallel) upstream save: tensors are cut "
            f"{factors.pop()} ways (e.g. {name!r} is {list(got)}, the model's {list(want)}). Merge the rank_N/ "
            "files into one first: mindspore.transform_checkpoints(SAVE_DIR, MERGED_DIR, 'merged', "
            "src_strategy_file=STRATEGY_CKPT, dst_strategy_file=None) with the strategy file the training "
            "wrote, then load (or --upstream migrate) MERGED_DIR/rank_0/merged0.ckpt")


def _example(family: str) -> str:
    return {"deepseek2": "'model.layers.1.feed_forward.routed_experts.ffn.w1.weight'",
            "wizardcoder": "'backbone.blocks.0.layernorm1.gamma'"}[family]


def convert_upstream(input_path: str, output_path: str, model: str, config: Any = None, dtype: Optional[str] = None,
                     progress: bool = True, overwrite: bool = False) -> ConversionResult:
    """Migrate an upstream MindFormers checkpoint of ``model`` to our layout at ``output_path`` (``.ckpt`` or
    ``.safetensors``; an existing one only with ``overwrite``)."""
    family = _family(model)
    source = open_source(input_path)
    _, wmap, cfg = plan_upstream(source, family, config)
    return convert(source, output_path, wmap, dtype=dtype, progress=progress, config=cfg, overwrite=overwrite)


# ------------------------------------------------------------------------------------------ loading
def upstream_candidate(path: str, network: Any, rank_id: Optional[int] = None) -> Optional[list[str]]:
    """The files of ``path`` (as ``load_checkpoint`` takes it) that hold an upstream MindFormers checkpoint of
    ``network``'s family, or None."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.checkpoint import candidate_groups, checkpoint_index, current_rank

    family = family_of_model(network)
    if family == "llama" or not os.path.exists(path):
        return None
    rank_id = current_rank() if rank_id is None else rank_id
    for group in candidate_groups(os.fspath(path), rank_id):
        names: list[str] = []
        try:
            for file in group:
                names += list(checkpoint_index(file))
        except Exception:  # pylint: disable=broad-except  (unreadable candidates are reported by the caller)
            continue
        if detect_upstream(names) == family:
            return list(group)
    return None


def _float_code(network: Any) -> str:
    for param in network.get_parameters():
        name = str(param.dtype).lower()
        for code, spelled in (("BF16", "bfloat16"), ("F16", "float16"), ("F32", "float32")):
            if spelled in name:
                return code
    return "F32"


def load_upstream_into(network: Any, files: Union[str, Sequence[str]], what: str = "load_checkpoint") -> list[str]:
    """Load the upstream MindFormers checkpoint ``files`` into ``network`` (one of ours), mapped tensor by tensor;
    every parameter must get a weight of its shape. Returns the files."""
    # pylint: disable=import-outside-toplevel
    from mindspore import Tensor
    from mindformers.tools.logger import logger

    from mindformers_ext.checkpoint import CheckpointError, compare, fuse_weights, unfused_parameters

    files = [files] if isinstance(files, str) else list(files)
    family = family_of_model(network)
    params = {p.name: p for p in network.get_parameters()}
    code = _float_code(network)
    try:
        entries = [e for file in files for e in open_source(file).entries()]
        names = ", ".join(os.path.basename(f) for f in files)
        label = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])}/{{{names}}}"
        source = WeightSource(label, lambda: entries)
        plan, wmap, _ = plan_upstream(source, family, network.config, code)
    except ConversionError as exc:
        raise CheckpointError(f"{what}: {exc}") from exc
    produced = {o.name: o.shape for o in plan.outputs}
    report = compare(unfused_parameters(network), produced)
    if not report.ok:
        raise CheckpointError(f"{what} {source.path}: an upstream MindFormers {_FAMILY_TITLE[family]} checkpoint that "
                              f"does not fit {type(network).__name__}: {report.describe(len(params))}")
    logger.info("%s %s: upstream MindFormers %s checkpoint layout (%s): mapped to ours while loading; "
                "tools/convert_weight.py --model %s --upstream migrates it once", what, source.path,
                _FAMILY_TITLE[family], _WHAT[family], family)
    for name, array in fuse_weights(network, mindspore_arrays(plan), source.path):
        param = params[name]
        param.set_data(Tensor(np.ascontiguousarray(array)).astype(param.dtype))
        del array
    logger.info("%s: loaded %d weights from %s (%s)", what, len(produced), source.path, wmap.name)
    return files
