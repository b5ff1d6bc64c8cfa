"""Weight maps as plain data: how one model family's tensors correspond between HF and our names.

A map is a dict of ``{}``-templated name pairs (litgpt's ``copy_weights_hf_llama`` style), e.g.
``"model.layers.{}.self_attn.q_proj.weight" -> "model.layers.{}.attention.wq.weight"``; a name's all-digit path
components fill the ``{}``s. The few entries that are more than a rename say so in the dict itself:

* an HF template with one more ``{}`` than ours (MoE experts): stacked along a new axis 0, in index order;
* several HF templates naming one of ours: concatenated along axis 0 in dict order (``WeightMap.part_rows``);
* a tuple of our templates: the HF tensor is split along axis 0 into them;
* ``WeightMap.layouts``: our template -> :class:`Layout` (rows permuted and/or axes transposed);
* ``WeightMap.qkv_concat``: the family's variant for checkpoints of ``qkv_concat`` models (upstream
  MindFormers' fused ``w_qkv`` / ``w_gate_hidden``: several HF tensors concatenated, rows in
  :func:`grouped_rows` order).

Our tensors and their shapes come from the model itself (:func:`skeleton`: the family's model built from the
config without weights); the HF side's follow from them through the map (:func:`hf_shapes`), so no shape is
written down twice. The "hf" side of the ``*_upstream`` maps is the layout of checkpoints written by upstream
MindFormers.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from mindformers_ext.convert.tensors import ConversionError

Shape = tuple[int, ...]

# Entries a MindSpore training checkpoint holds besides model weights: optimizer state, step counters,
# loss scale. Skipped (and reported) when converting such a checkpoint to HF.
MS_TRAINING_STATE = (
    r"(adam_m|adam_v|moment1|moment2|moments|accu_grads|accumulate_grads|zeros|exp_avg|exp_avg_sq)\..*",
    r"global_step|learning_rate|epoch_num|step_num|loss_scale|scale_sense|current_iterator_step"
    r"|last_overflow_iterator_step|beta1_power|beta2_power|micro_size",
)


def tied_head(head: str, tied_default: bool, base: Sequence[str] = ()) -> Callable[[dict], tuple[str, ...]]:
    """Ignore rules: ``base``, plus ``head`` (a regex) when the config ties the LM head to the embedding."""
    def rules(cfg: dict) -> tuple[str, ...]:
        return tuple(base) + ((head,) if cfg.get("tie_word_embeddings", tied_default) else ())
    return rules


def config_reader(title: str, hf_key: str, hf_label: str, our_config: Callable[[dict], Any],
                  is_ours: Callable[[Any], bool], to_hf: Callable[[Any], dict],
                  model_type: Optional[str] = None) -> Callable[[Any], dict]:
    """A map's ``hf_config``: an HF config dict from an HF dict / transformers config (with ``hf_key``, or
    ``model_type``), our config object (``is_ours``; converted by ``to_hf``), or our YAML's ``model_config``
    dict (with ``num_layers``; built by ``our_config``)."""
    def read(config: Any) -> dict:
        if isinstance(config, dict):
            if hf_key in config or (model_type is not None and config.get("model_type") == model_type):
                return dict(config)
            if "num_layers" in config:
                return read(our_config(config))
            raise KeyError(f"the config has neither {hf_key} ({hf_label}) nor num_layers (ours)")
        if is_ours(config):
            return to_hf(config)
        if hasattr(config, "to_dict"):
            return read(config.to_dict())
        raise TypeError(f"cannot read a {title} config from {type(config).__name__}")
    return read


def split_name(name: str) -> tuple[str, tuple[int, ...]]:
    """``'model.layers.3.mlp.experts.7.w'`` -> ``('model.layers.{}.mlp.experts.{}.w', (3, 7))``."""
    parts = name.split(".")
    indices = tuple(int(p) for p in parts if p.isdigit())
    return ".".join("{}" if p.isdigit() else p for p in parts), indices


def fill(template: str, indices: Sequence[int]) -> str:
    return template.format(*indices)


def grouped_rows(sizes: Sequence[int], groups: int) -> np.ndarray:
    """Row order taking tensors of ``sizes`` rows, concatenated along axis 0, to upstream MindFormers' fused
    layout (v1.5.0 ``qkv_concat_hf2mg`` / ``ffn_concat_hf2mg``): each part cut into ``groups`` equal groups,
    stored group by group (``[p0 g0, p1 g0, ..., p0 g1, p1 g1, ...]``); one group per key/value head for
    q/k/v, one row per group for gate/up (interleaved)."""
    starts = np.cumsum((0,) + tuple(sizes[:-1]))
    return np.concatenate([start + np.arange(size).reshape(groups, -1) for start, size in zip(starts, sizes)],
                          axis=1).reshape(-1)


@dataclass(frozen=True)
class Layout:
    """How one of our tensors is laid out relative to the other side: ``ours = other[rows(n, config)]``
    (a row order over the ``n`` rows, e.g. DeepSeek-V2's RoPE rows), then transposed by ``axes``."""

    rows: Optional[Callable[[int, dict], np.ndarray]] = None
    axes: Optional[tuple[int, ...]] = None

    def to_ours(self, array: np.ndarray, config: dict) -> np.ndarray:
        if self.rows is not None:
            array = array[self.rows(array.shape[0], config)]
        return np.ascontiguousarray(array.transpose(self.axes) if self.axes else array)

    def to_hf(self, array: np.ndarray, config: dict) -> np.ndarray:
        if self.axes:
            array = array.transpose(np.argsort(self.axes))
        if self.rows is not None:
            array = array[np.argsort(self.rows(array.shape[0], config))]
        return np.ascontiguousarray(array)


@dataclass(frozen=True)
class Move:
    """HF tensors ``hf`` (one, or several joined along axis 0: stacked when ``stack``, else concatenated)
    -> our tensors ``ours`` (one, with ``layout``; or several, the rows ``sizes`` of the joined tensor)."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]
    stack: bool = False
    layout: Optional[Layout] = None
    sizes: tuple[int, ...] = ()


Ignore = Union[Sequence[str], Callable[[dict], Sequence[str]]]


@dataclass(frozen=True)
class WeightMap:
    """One model family's weights, both directions."""

    name: str  # --model
    names: Mapping[str, Union[str, tuple[str, ...]]]  # HF template -> ours (a tuple: a split)
    shapes: Callable[[dict], dict[str, Shape]]  # HF config -> every tensor of ours, in order (:func:`skeleton`)
    hf_config: Callable[[Any], dict]  # an HF config dict from an HF dict, our config object or YAML dict
    layouts: Mapping[str, Layout] = field(default_factory=dict)  # our template -> Layout
    # (our template, its shape before the layout, HF config) -> rows of each HF tensor concatenated into it
    part_rows: Optional[Callable[[str, Shape, dict], Sequence[int]]] = None
    hf_ignore: Ignore = ()  # regexes (full match) of source names to skip, or a function of the HF config
    ours_ignore: Ignore = MS_TRAINING_STATE
    shape_notes: Mapping[str, str] = field(default_factory=dict)  # template -> how the config sets its shape
    summary_keys: Sequence[str] = ()  # HF config keys quoted in error messages
    model_types: Sequence[str] = ()  # HF model_type values this map handles
    # HF config -> the variant for it, for a family whose variants store one HF tensor differently
    # (GPT-BigCode's fused c_attn: multi-query or not); None: this map serves every config
    select: Optional[Callable[[dict], "WeightMap"]] = None
    # the variant whose checkpoints hold fused projections (``--qkv_concat``; recognised by name when reversing)
    qkv_concat: Optional["WeightMap"] = None

    def for_config(self, config: dict) -> "WeightMap":
        if self.select is None:
            return self
        chosen = self.select(config)
        if not isinstance(chosen, WeightMap):
            raise ConversionError(f"weight map {self.name!r}: select() did not return a WeightMap")
        return chosen

    def templates(self, side: str) -> set[str]:
        if side == "hf":
            return set(self.names)
        return {t for v in self.names.values() for t in ((v,) if isinstance(v, str) else v)}

    def ignore_patterns(self, side: str, config: dict) -> Sequence[str]:
        rules = self.hf_ignore if side == "hf" else self.ours_ignore
        return tuple(rules(config) if callable(rules) else rules)

    def note(self, name: str) -> str:
        """How the config sets ``name``'s shape (empty when the map does not say)."""
        template = split_name(name)[0]
        for key in (name, template):
            if key in self.shape_notes:
                return self.shape_notes[key]
        hf = [k for k, v in self.names.items() if v == template]
        return self.shape_notes.get(hf[0], "") if hf else ""

    def summary(self, config: dict) -> str:
        return ", ".join(f"{k}={config[k]}" for k in self.summary_keys if k in config)


def upstream_map(family: WeightMap, **fields: Any) -> WeightMap:
    """The map of ``family``'s checkpoints written by upstream MindFormers (its "hf" side): ``fields`` replace
    the family's; our tensors (``shapes``), the config reader, the summary and the training-state ignore
    rules stay."""
    base = dict(name=family.name + UPSTREAM_SUFFIX, hf_ignore=family.ours_ignore, layouts={}, part_rows=None,
                shape_notes={}, model_types=(), select=None, qkv_concat=None)
    return dataclasses.replace(family, **{**base, **fields})


def skeleton(model_type: str, **overrides: Any) -> Callable[[dict], dict[str, Shape]]:
    """A map's ``shapes``: the parameters of :func:`skeleton_model` for an HF config."""
    def shapes(config: dict) -> dict[str, Shape]:
        model = skeleton_model(model_type, config, **overrides)
        return {name: tuple(param.shape) for name, param in model.parameters_and_names()}
    return shapes


def skeleton_model(model_type: str, config: dict, **overrides: Any) -> Any:
    """The model that loads HF checkpoints of ``model_type``, built for the HF ``config`` (with config
    ``overrides``, e.g. ``qkv_concat=True``) without allocating its weights; built once per config and
    overrides (the upstream loader tries several configs and map variants of one model)."""
    return _skeleton_model(model_type, json.dumps(config, sort_keys=True, default=str),
                           tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=16)
def _skeleton_model(model_type: str, config: str, overrides: tuple) -> Any:
    # pylint: disable=import-outside-toplevel
    from mindspore.nn.utils import no_init_parameters

    from mindformers_ext.hf_loader import build_from_hf_config

    with no_init_parameters():
        return build_from_hf_config({**json.loads(config), "model_type": model_type}, "the config", use_past=False,
                                    **dict(overrides))[0]


def hf_shapes(wmap: WeightMap, config: dict, ours: Optional[Mapping[str, Shape]] = None) -> dict[str, Shape]:
    """Every tensor of the map's other side that ``config`` implies, with its shape, in the order of ours
    (``ours``: ``wmap.shapes(config)``): axes transposed back, stacked tensors unstacked, a tensor that several
    are concatenated into cut into ``wmap.part_rows``, tensors that one is split into joined again."""
    ours = wmap.shapes(config) if ours is None else ours
    others: dict[str, list[str]] = {}  # our template -> the other side's templates that make it, in dict order
    for other, mine in wmap.names.items():
        for template in (mine,) if isinstance(mine, str) else mine:
            others.setdefault(template, []).append(other)
    shapes: dict[str, Shape] = {}
    for name, shape in ours.items():
        template, idx = split_name(name)
        if template not in others:
            raise ConversionError(f"weight map {wmap.name!r} does not name the model's tensor {name!r}")
        axes = wmap.layouts[template].axes if template in wmap.layouts else None
        shape = tuple(shape[i] for i in np.argsort(axes)) if axes else tuple(shape)
        first = others[template][0]
        if not isinstance(wmap.names[first], str):  # split into several of ours: their rows add up
            hf = fill(first, idx)
            shapes[hf] = (shapes.get(hf, (0,))[0] + shape[0],) + shape[1:]
        elif first.count("{}") > len(idx):  # stacked: one of theirs per index of our axis 0
            shapes.update((fill(first, idx + (j,)), shape[1:]) for j in range(shape[0]))
        else:
            rows = wmap.part_rows(template, shape, config) if len(others[template]) > 1 else [shape[0]]
            shapes.update((fill(other, idx), (r,) + shape[1:]) for other, r in zip(others[template], rows))
    return shapes


def moves(wmap: WeightMap, config: dict, ours: Optional[Mapping[str, Shape]] = None) -> list[Move]:
    """The map expanded for ``config`` (an HF config dict), in the order of our tensors (``ours``)."""
    ours = wmap.shapes(config) if ours is None else ours
    groups: dict[tuple[str, ...], list[str]] = {}  # our name(s) -> the HF names they are made of, in order
    stacked = set()
    for hf in hf_shapes(wmap, config, ours):
        template, idx = split_name(hf)
        mine = wmap.names[template]
        if isinstance(mine, str) and mine.count("{}") < len(idx):  # one index more: the stacked one (an expert)
            key = (fill(mine, idx[:-1]),)
            stacked.add(key)
        else:
            key = tuple(fill(t, idx) for t in ((mine,) if isinstance(mine, str) else mine))
        groups.setdefault(key, []).append(hf)
    out = []
    for names, hf in groups.items():
        if len(names) > 1:
            out.append(Move(tuple(hf), names, sizes=tuple(ours[n][0] for n in names)))
        else:
            out.append(Move(tuple(hf), names, names in stacked, wmap.layouts.get(split_name(names[0])[0])))
    return out


# ------------------------------------------------------------------------------------------- registry
# --model name -> map module (DeepSeek-Coder v1 / v1.5 are Llama-shaped: same map); ``<name>_upstream``:
# checkpoints written by upstream MindFormers' converters / training (``--upstream``), in the same module
BUILTIN_MAPS = {
    "llama": "llama", "deepseek": "llama", "deepseek1_5": "llama", "deepseek_coder": "llama",
    "deepseek2": "deepseek2", "deepseek_v2": "deepseek2",
    "wizardcoder": "wizardcoder", "gpt_bigcode": "wizardcoder",
}
UPSTREAM_SUFFIX = "_upstream"
# HF config.json model_type -> --model name
MODEL_TYPES = {"llama": "llama", "deepseek_v2": "deepseek2", "gpt_bigcode": "wizardcoder"}

_REGISTERED: dict[str, WeightMap] = {}


def register_weight_map(wmap: WeightMap, *names: str) -> WeightMap:
    """Make ``wmap`` available as ``wmap.name`` and ``names`` (overrides a built-in)."""
    for name in (wmap.name, *names):
        _REGISTERED[name] = wmap
    for model_type in wmap.model_types:
        MODEL_TYPES.setdefault(model_type, wmap.name)
    return wmap


def available_models() -> list[str]:
    """Names ``--model`` accepts."""
    builtin = {n + s for n in BUILTIN_MAPS for s in ("", UPSTREAM_SUFFIX)}
    return sorted(builtin | set(_REGISTERED))


def get_weight_map(model: Union[str, WeightMap]) -> WeightMap:
    """The weight map for ``model`` (a name such as ``'deepseek'``, or a map, returned as is)."""
    if isinstance(model, WeightMap):
        return model
    if model in _REGISTERED:
        return _REGISTERED[model]
    upstream = model.endswith(UPSTREAM_SUFFIX)
    family = BUILTIN_MAPS.get(model[:-len(UPSTREAM_SUFFIX)] if upstream else model)
    if family is None and upstream:
        raise ConversionError(f"no upstream MindFormers layout for model {model[:-len(UPSTREAM_SUFFIX)]!r}; "
                              f"--upstream knows: {sorted(BUILTIN_MAPS)}")
    if family is None:
        raise ConversionError(f"no weight map for model {model!r}; available: {available_models()}")
    module_name = f"mindformers_ext.convert.maps.{family}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConversionError(f"model {model!r} has no weight map yet (expected module {module_name})") from exc
    return getattr(module, "UPSTREAM_MAP" if upstream else "WEIGHT_MAP")


def weight_map_for_model_type(model_type: str) -> WeightMap:
    """The weight map for an HF ``config.json`` ``model_type`` (``'llama'``, ``'deepseek_v2'``, ...)."""
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"no weight map for HF model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return get_weight_map(MODEL_TYPES[model_type])


# -------------------------------------------------------------------------------------------- configs
def load_config(config: Any, wmap: WeightMap, upstream: bool = False) -> dict:
    """An HF config dict for ``wmap`` from a path (HF ``config.json``, a directory holding one, our YAML; with
    ``upstream`` also upstream's YAML), a dict, or a config object."""
    if not isinstance(config, (str, os.PathLike)):
        check_model_type(wmap, config, "the config")
        return check_map_config(wmap, config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: config file not found")
    if path.endswith((".yaml", ".yml")):
        config = yaml_model_config(path, upstream)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path}: cannot read the config as JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ConversionError(f"{path}: the config is not a JSON object")
    check_model_type(wmap, config, path)
    try:
        return check_map_config(wmap, config)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from exc


def check_model_type(wmap: WeightMap, config: Any, where: str) -> None:
    """Refuse an HF config whose ``model_type`` is not one the map converts (a wrong ``--model``)."""
    kind = config.get("model_type") if isinstance(config, dict) else None
    if not kind or not wmap.model_types or kind in wmap.model_types:
        return
    hint = f"; for this checkpoint use --model {MODEL_TYPES[kind]}" if kind in MODEL_TYPES else ""
    raise ConversionError(f"{where}: model_type {kind!r} is not a {wmap.name} checkpoint (--model {wmap.name} "
                          f"expects model_type {' / '.join(map(repr, wmap.model_types))}){hint}")


def check_map_config(wmap: WeightMap, config: Any) -> dict:
    """``wmap.hf_config(config)``, with a clear error when it is not a usable dict."""
    try:
        hf = wmap.hf_config(config)
    except ConversionError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"{wmap.name}: cannot use the config: {exc}") from exc
    if not isinstance(hf, dict):
        raise ConversionError(f"{wmap.name}: the config did not give an HF config dict")
    return hf


def yaml_model_config(path: str, upstream: bool = False) -> dict:
    """``model.model_config`` of our YAML; with ``upstream``, also of upstream's (translated to ours)."""
    import yaml  # pylint: disable=import-outside-toplevel
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path}: cannot read the YAML: {exc}") from exc
    if upstream:
        from mindformers_ext.upstream import translate_config  # pylint: disable=import-outside-toplevel
        if not isinstance(doc, dict):
            raise ConversionError(f"{path}: the top level of the YAML must be a mapping")
        translate_config(doc, path, warn=lambda m: None, info=lambda m: None)
    model_config = ((doc or {}).get("model") or {}).get("model_config") if isinstance(doc, dict) else None
    if not isinstance(model_config, dict):
        raise ConversionError(f"{path}: no model.model_config section")
    drop = ("auto_register", "checkpoint_name_or_path") if upstream else ()
    return {k: v for k, v in model_config.items() if k not in drop}
