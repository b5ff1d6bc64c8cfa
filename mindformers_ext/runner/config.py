"""Building the MindFormers config of a run: YAML + command line + device-specific adjustments.

Order matters (see ``../shared/DESIGN.md``): MindFormers fills a YAML from a template chosen by
``run_mode`` (``processor`` is dropped for train modes, ``context.device_target`` defaults to
Ascend, ``runner_wrapper`` to ``MFTrainOneStepCell``), so ``run_mode`` is set on the raw YAML
first, then the template is applied, then the flags and ``--a.b.c`` overrides, and last the
adjustments for the device actually used (:func:`adapt_to_device`).
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Any, Optional

import yaml

from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerConfig
from mindformers.tools.register.template import ConfigTemplate

__all__ = ["ConfigError", "load_yaml", "apply_overrides", "build_config", "ascend_available",
           "adapt_to_device", "checkpoint_format", "full_copy_layout", "available_cores", "PORTABLE_WRAPPER",
           "PORTABLE_ADAMW"]

PORTABLE_WRAPPER = "PortableTrainOneStepCell"
PORTABLE_ADAMW = "PortableAdamW"
# Wrappers that need NPU / GPU overflow status operators; replaced by the portable one on CPU.
_DEVICE_ONLY_WRAPPERS = ("MFTrainOneStepCell", "TrainOneStepWithLossScaleCell", "loss_scale_wrapper",
                         "mf_wrapper")
_SEMI_AUTO = (1, 2, "semi_auto_parallel", "auto_parallel")


class ConfigError(ValueError):
    """A problem with the YAML or an override; the message names the file and key."""


def yaml_error_line(path: str, exc: Exception) -> str:
    """``FILE:LINE:COLUMN: invalid YAML: PROBLEM`` (one line) for a PyYAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = path
    if mark is not None:
        name = mark.name if mark.name and os.path.isfile(str(mark.name)) else path  # a base_config file
        where = f"{name}:{mark.line + 1}:{mark.column + 1}"
    problem = ": ".join(str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None))
                       if part) or str(exc).splitlines()[0]
    return f"{where}: invalid YAML: {problem}"


# (section path, registry kind) of the class names a run builds from its YAML
TYPED_SECTIONS = ((("model", "arch"), "MODELS"), (("model", "model_config"), "CONFIG"),
                  (("processor", "tokenizer"), "TOKENIZER"))


def check_types(config: Any) -> None:
    """Fail with the file, the key and close registered names when a ``type`` the run builds is unknown
    (MindFormers would end in a long registry traceback)."""
    # pylint: disable=import-outside-toplevel
    import difflib

    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    path = config.get("config_path", "config") if hasattr(config, "get") else "config"
    for keys, kind in TYPED_SECTIONS:
        node = config
        for key in keys:
            node = node.get(key) if hasattr(node, "get") else None
        kind_name = node.get("type") if hasattr(node, "get") else None
        if not kind_name:
            continue
        module_type = getattr(MindFormerModuleType, kind)
        if MindFormerRegister.is_exist(module_type, kind_name):
            continue
        known = sorted(MindFormerRegister.registry.get(module_type, {}))
        close = difflib.get_close_matches(str(kind_name), known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            " (a class of another package needs --register_path)"
        label = {"MODELS": "model", "CONFIG": "model config", "TOKENIZER": "tokenizer"}[kind]
        raise ConfigError(f"{path}: {'.'.join(keys)}.type: unknown {label} type {kind_name!r}{hint}")


def _shipped_yaml_hint(path: str) -> str:
    """'; did you mean ...' naming shipped YAMLs (research/, configs/) with the same or a close file name:
    upstream READMEs name them in per-model sub-folders (``research/deepseek2/deepseek2_236b/...``) or by
    older names (``run_train_deepseek2_236B.yaml``)."""
    import difflib  # pylint: disable=import-outside-toplevel

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shipped = sorted(glob.glob(os.path.join(root, "research", "*", "*.yaml")) +
                     glob.glob(os.path.join(root, "configs", "*", "*.yaml")))
    by_name: dict = {}
    for found in shipped:
        by_name.setdefault(os.path.basename(found), []).append(os.path.relpath(found, root))
    name = os.path.basename(path)
    close = by_name.get(name) or [p for n in difflib.get_close_matches(name, list(by_name), n=2, cutoff=0.6)
                                  for p in by_name[n]]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def load_yaml(path: str) -> dict:
    """The raw YAML as a dict (``base_config`` includes resolved), before MindFormers' template."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist{_shipped_yaml_hint(path)}")
    try:
        # pylint: disable=protected-access
        raw = MindFormerConfig._file2dict(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8: byte 0x{exc.object[exc.start]:02x} at byte offset "
                          f"{exc.start}") from None
    except (yaml.YAMLError, ValueError) as exc:
        cause = exc if isinstance(exc, yaml.YAMLError) else exc.__cause__  # MindFormers wraps it in ValueError
        if isinstance(cause, yaml.YAMLError):
            raise ConfigError(yaml_error_line(path, cause)) from None
        raise ConfigError(f"{path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level of the YAML must be a mapping")
    return dict(raw)


def _child(node: Any, part: str) -> Any:
    """``node[part]`` for a mapping, ``node[int(part)]`` for a list; None when absent."""
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return node[int(part)]
    return None


# Enumerations whose values include the string "None" (MindFormers' spelling of "no RoPE scaling"):
# an override "None" sets that string, not null.
STRING_NONE_KEYS = ("extend_method",)


def _typed_like(current: Any, value: Any, raw: Optional[str], key: str) -> Any:
    """An override's value, typed after what the YAML holds at that key: a field the YAML holds as a
    string (an enumeration, a token) stays a string where YAML would read the text as something else
    (``None`` for ``extend_method: "None"``, ``[PAD]`` as a list); other values keep their YAML type."""
    if value is None and (key in STRING_NONE_KEYS or current == "None") and \
            (raw is None or raw.strip().lower() in ("none", "null", "~")):
        return "None"
    if raw is not None and isinstance(current, str) and current and isinstance(value, (list, dict)):
        return raw
    return value


DELETE = "__delete__"


def apply_overrides(config: dict, overrides: dict[str, Any], source: str = "command line") -> None:
    """Set dotted keys in ``config`` (a number indexes a list: ``callbacks.1.prefix``). Every parent
    must exist (typos are errors); the leaf key may be new. Values are typed as YAML scalars, except
    that a key the YAML holds as a string stays a string (see :func:`_typed_like`). The value
    ``__delete__`` removes the key (or the list entry; overrides apply in order), e.g.
    ``--callbacks.1 __delete__`` drops a callback an upstream YAML lists."""
    raw_texts = getattr(overrides, "raw", {})
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = config
        for depth, part in enumerate(parts[:-1]):
            child = _child(node, part)
            if not isinstance(child, (dict, list)):
                where = ".".join(parts[:depth + 1])
                known = sorted(node) if isinstance(node, dict) else f"indices 0-{len(node) - 1}"
                raise ConfigError(f"{source}: override --{dotted}: {where!r} is not a section of the config "
                                  f"(there: {known})")
            node = child
        leaf = parts[-1]
        if value == DELETE:
            if isinstance(node, list) and leaf.lstrip("-").isdigit() and -len(node) <= int(leaf) < len(node):
                del node[int(leaf)]
            elif isinstance(node, dict) and leaf in node:
                del node[leaf]
            else:
                raise ConfigError(f"{source}: override --{dotted} {DELETE}: there is no such key to delete")
            logger.info("override --%s removes it from the config", dotted)
            continue
        if isinstance(node, list):
            if _child(node, leaf) is None and not (leaf.lstrip("-").isdigit() and -len(node) <= int(leaf) < len(node)):
                raise ConfigError(f"{source}: override --{dotted}: index {leaf} is out of range "
                                  f"(the list has {len(node)} entries)")
            node[int(leaf)] = value
            continue
        if leaf not in node:
            logger.info("override --%s adds a new key", dotted)
        node[leaf] = _typed_like(node.get(leaf), value, raw_texts.get(dotted), leaf)


def ascend_available() -> bool:
    """True when an Ascend NPU device node is present on this machine."""
    return bool(glob.glob("/dev/davinci[0-9]*"))


def checkpoint_format(path: str) -> Optional[str]:
    """'safetensors' or 'ckpt' from a checkpoint file or a directory's files; None when unknown."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors"
        return "ckpt" if path.endswith(".ckpt") else None
    if os.path.isdir(path):
        names = [n for _, _, files in os.walk(path) for n in files]
        if any(n.endswith(".ckpt") for n in names):
            return "ckpt"
        if any(n.endswith(".safetensors") for n in names):
            return "safetensors"
    return None


def _apply_flags(config: dict, args: argparse.Namespace) -> None:
    """The flags that map one-to-one on config keys."""
    simple = {
        "seed": "seed", "use_parallel": "use_parallel", "load_checkpoint": "load_checkpoint",
        "load_ckpt_format": "load_ckpt_format", "src_strategy_path_or_dir": "src_strategy_path_or_dir",
        "auto_trans_ckpt": "auto_trans_ckpt", "transform_process_num": "transform_process_num",
        "only_save_strategy": "only_save_strategy", "resume_training": "resume_training",
        "do_eval": "do_eval", "predict_batch_size": "predict_batch_size", "output_dir": "output_dir",
        "profile": "profile",
    }
    for flag, key in simple.items():
        value = getattr(args, flag, None)
        if value is not None:
            config[key] = value
    context = config.setdefault("context", {})
    for flag in ("device_id", "device_target", "mode"):
        value = getattr(args, flag, None)
        if value is not None:
            context[flag] = value
    runner = config.setdefault("runner_config", {})
    for flag in ("epochs", "batch_size", "gradient_accumulation_steps", "sink_mode"):
        value = getattr(args, flag, None)
        if value is not None:
            runner[flag] = value
    for flag, section in (("train_dataset_dir", "train_dataset"), ("eval_dataset_dir", "eval_dataset")):
        value = getattr(args, flag, None)
        if value is not None:
            loader = config.get(section, {}).get("data_loader") if isinstance(config.get(section), dict) else None
            if not isinstance(loader, dict):
                raise ConfigError(f"--{flag} given but the config has no {section}.data_loader section")
            loader["dataset_dir"] = value
    if getattr(args, "num_samples", None) is not None:
        for section in ("train_dataset", "eval_dataset"):
            loader = (config.get(section) or {}).get("data_loader")
            if isinstance(loader, dict):
                loader["num_samples"] = args.num_samples
    model_config = (config.get("model") or {}).get("model_config")
    if getattr(args, "use_past", None) is not None and isinstance(model_config, dict):
        model_config["use_past"] = args.use_past


def build_config(args: argparse.Namespace, overrides: Optional[dict[str, Any]] = None) -> MindFormerConfig:
    """The full MindFormers config for ``args`` (from :func:`cli.parse_args`) and ``overrides``."""
    path = os.path.abspath(args.config)
    raw = load_yaml(path)
    if args.run_mode is not None:
        raw["run_mode"] = args.run_mode
    if raw.get("run_mode") not in ("train", "finetune", "eval", "predict"):
        raise ConfigError(f"{path}: run_mode must be one of train, finetune, eval, predict (got "
                          f"{raw.get('run_mode')!r}); set it in the YAML or pass --run_mode")
    try:
        ConfigTemplate.apply_template(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    _apply_flags(raw, args)
    apply_overrides(raw, overrides or {}, source=path)
    # upstream MindFormers' spellings (types, callbacks, moe_config); after the overrides, which may set moe_config
    from mindformers_ext.upstream import translate_config  # pylint: disable=import-outside-toplevel

    translate_config(raw, path)
    config = MindFormerConfig(**raw)
    config.config_path = path
    return config


def _resolve_device_target(config: MindFormerConfig, explicit: bool) -> str:
    target = config.context.get("device_target") or "Ascend"
    if not explicit and target == "Ascend" and not ascend_available():
        logger.info("no Ascend device on this machine: running on CPU (context.device_target: CPU)")
        target = "CPU"
    config.context.device_target = target
    return target


def _adapt_wrapper(config: MindFormerConfig, target: str) -> None:
    """On CPU swap NPU-only train wrappers for the portable one; move gradient accumulation into it
    wherever MindFormers would drop it (data parallel / stand-alone)."""
    wrapper = config.get("runner_wrapper")
    if wrapper is None:
        return
    if target == "CPU" and wrapper.get("type") in _DEVICE_ONLY_WRAPPERS:
        logger.info("runner_wrapper %s needs NPU/GPU overflow-status operators: using %s on CPU",
                    wrapper.type, PORTABLE_WRAPPER)
        wrapper.type = PORTABLE_WRAPPER
    runner = config.runner_config
    steps = int(runner.get("gradient_accumulation_steps") or 1)
    semi_auto = config.get("use_parallel") and config.parallel.get("parallel_mode") in _SEMI_AUTO
    if wrapper.get("type") == PORTABLE_WRAPPER and steps > 1 and not semi_auto:
        # MindFormers resets gradient_accumulation_steps to 1 outside semi-auto parallel; the portable
        # wrapper accumulates inside one step over micro-batches of the per-step batch.
        logger.info("gradient accumulation over %d micro-batches of %d in %s", steps, runner.batch_size,
                    PORTABLE_WRAPPER)
        wrapper.gradient_accumulation_steps = steps
        runner.batch_size = runner.batch_size * steps
        runner.gradient_accumulation_steps = 1


def _adapt_optimizer(config: MindFormerConfig, target: str) -> None:
    """On CPU run MindFormers' AdamW as the fused PortableAdamW (same maths and state, one memory
    pass per parameter instead of about fifteen)."""
    optimizer = config.get("optimizer")
    if target == "CPU" and optimizer is not None and optimizer.get("type") == "AdamW":
        logger.info("optimizer AdamW: using its fused equivalent %s on CPU", PORTABLE_ADAMW)
        optimizer.type = PORTABLE_ADAMW


_DTYPE_KEYS = ("compute_dtype", "param_init_type", "layernorm_compute_type", "softmax_compute_type", "rotary_dtype")


def _adapt_dtypes(config: MindFormerConfig, target: str) -> None:
    """bfloat16 kernels are missing on CPU (Reshape, MatMul, ...): compute in float32 there."""
    model_config = (config.get("model") or {}).get("model_config")
    if target != "CPU" or model_config is None:
        return
    changed = [key for key in _DTYPE_KEYS if str(model_config.get(key, "")).lower() in ("bfloat16", "bf16")]
    if changed:
        logger.warning("model_config %s: bfloat16 does not run on CPU; using float32 (bfloat16 checkpoints are "
                       "converted when loaded)", ", ".join(changed))
        for key in changed:
            model_config[key] = "float32"


# parallel_config fields that split the model; data parallel on CPU needs every one at 1
_MODEL_SPLITS = ("model_parallel", "pipeline_stage", "expert_parallel", "context_parallel", "micro_batch_num")


def _reset_model_splits(config: MindFormerConfig) -> list[str]:
    """Set the model-splitting parallel sizes to 1 (``parallel_config`` and an upstream-style
    ``moe_config.expert_parallel``); returns "key old -> 1" for each one changed."""
    changed = []
    sections = [("parallel_config", config.get("parallel_config"))]
    if isinstance(config.get("moe_config"), dict):
        sections.append(("moe_config", config.moe_config))
    for name, section in sections:
        if not isinstance(section, dict):
            continue
        for key in _MODEL_SPLITS:
            value = section.get(key)
            if value is not None and not isinstance(value, bool) and isinstance(value, int) and value > 1:
                changed.append(f"{name}.{key} {value} -> 1")
                section[key] = 1
        if section.get("use_seq_parallel"):
            changed.append(f"{name}.use_seq_parallel True -> False")
            section["use_seq_parallel"] = False
    return changed


def _adapt_parallel(config: MindFormerConfig, target: str) -> None:
    """Semi-auto parallel does not compile on CPU: fall back to data parallel there, with every model
    split (model / pipeline / expert / context parallel) at 1: each rank holds the whole model."""
    if target != "CPU" or not config.get("use_parallel"):
        return
    mode = config.parallel.get("parallel_mode")
    if mode in _SEMI_AUTO:
        config.parallel.parallel_mode = 0
        config.parallel.full_batch = False
        config.parallel.pop("dataset_strategy", None)
        config.parallel.enable_parallel_optimizer = False
        config.parallel.gradients_mean = True
    changed = _reset_model_splits(config)
    splits = f" ({', '.join(changed)})" if changed else ""
    if mode in _SEMI_AUTO:
        logger.warning("parallel_mode %s (semi-auto / auto parallel) only runs on Ascend: running data parallel on "
                       "CPU, every rank holding the whole model%s. The layout itself can be checked with "
                       "tools/check_parallel.py.", mode, splits)
    elif changed:
        logger.warning("data parallel on CPU: every rank holds the whole model%s", splits)


def _package_relative(path: str) -> str:
    """A relative path that does not exist here but does under the project root (the shipped demo
    checkpoint, ``mindformers_ext/assets/...``), resolved there; anything else unchanged."""
    if path and not os.path.isabs(path) and not os.path.exists(path):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.exists(os.path.join(root, path)):
            return os.path.join(root, path)
    return path


def full_copy_layout(config: MindFormerConfig) -> bool:
    """True when every rank holds the whole model: one process, or data parallel (what CPU runs)."""
    if not config.get("use_parallel"):
        return True
    return config.get("parallel", {}).get("parallel_mode") not in _SEMI_AUTO


def _adopt_checkpoint_name_or_path(config: MindFormerConfig) -> None:
    """``model.model_config.checkpoint_name_or_path`` names the weights when ``load_checkpoint`` does not
    (MindFormers' Trainer silently drops it for train / finetune): move it to ``load_checkpoint``, which
    every run mode loads; when both are set ``load_checkpoint`` wins, as in MindFormers."""
    model_config = (config.get("model") or {}).get("model_config")
    named = model_config.get("checkpoint_name_or_path") if isinstance(model_config, dict) else None
    if not named:
        return
    if not config.get("load_checkpoint"):
        logger.info("model.model_config.checkpoint_name_or_path %s: loading it (as load_checkpoint)", named)
        config.load_checkpoint = named
        config.load_checkpoint_key = "model.model_config.checkpoint_name_or_path"
    elif os.path.abspath(str(named)) != os.path.abspath(str(config.load_checkpoint)):
        logger.warning("both load_checkpoint %s and model.model_config.checkpoint_name_or_path %s are set: loading "
                       "load_checkpoint", config.load_checkpoint, named)
    model_config.checkpoint_name_or_path = ""


def _adapt_auto_trans(config: MindFormerConfig) -> None:
    """``auto_trans_ckpt`` reshards a checkpoint to the run's model split. With nothing to split (one
    process or data parallel: every rank holds the whole model) and no source strategy (a full
    checkpoint), there is nothing to transform: every rank loads the full checkpoint."""
    if not (config.get("auto_trans_ckpt") and config.get("load_checkpoint")):
        return
    if full_copy_layout(config) and not config.get("src_strategy_path_or_dir"):
        logger.info("auto_trans_ckpt: nothing to transform (%s, every rank holds the whole model): every rank "
                    "loads the full checkpoint %s", "data parallel" if config.get("use_parallel") else "one device",
                    config.load_checkpoint)
        config.auto_trans_ckpt = False


def _adapt_checkpoint(config: MindFormerConfig) -> None:
    """Infer ``load_ckpt_format`` from the files; default the resume source to output_dir/checkpoint."""
    _adopt_checkpoint_name_or_path(config)
    if config.get("resume_training") and not config.get("load_checkpoint"):
        default = os.path.join(config.get("output_dir") or "./output", "checkpoint")
        if not os.path.isdir(default):
            raise ConfigError(f"resume_training is set but load_checkpoint is empty and {default} does not exist")
        logger.info("resume_training: loading from %s", default)
        config.load_checkpoint = default
    path = config.load_checkpoint = _package_relative(config.get("load_checkpoint"))
    if path and not os.path.exists(path):
        raise ConfigError(f"{config.get('load_checkpoint_key') or 'load_checkpoint'} {path!r} does not exist")
    if path:
        found = checkpoint_format(path)
        if found and found != config.get("load_ckpt_format"):
            logger.info("load_checkpoint %s holds %s files: load_ckpt_format: %s", path, found, found)
            config.load_ckpt_format = found
    _adapt_auto_trans(config)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _adapt_dataset_workers(config: MindFormerConfig) -> None:
    """MindSpore's datasets refuse more ``num_parallel_workers`` than the machine has cores: cap them."""
    cores = available_cores()
    for section in ("train_dataset", "eval_dataset"):
        dataset = config.get(section)
        if not isinstance(dataset, dict):
            continue
        for where, node in ((section, dataset), (f"{section}.data_loader", dataset.get("data_loader"))):
            if not isinstance(node, dict):
                continue
            workers = node.get("num_parallel_workers")
            if isinstance(workers, int) and not isinstance(workers, bool) and workers > cores:
                logger.warning("%s.num_parallel_workers %d exceeds the %d CPU cores available: using %d", where,
                               workers, cores, cores)
                node["num_parallel_workers"] = cores


def _adapt_threads(target: str) -> None:
    """On CPU use all cores this process may run on (its affinity: taskset, a container's cpuset), shared
    among the local workers of an msrun job."""
    if target != "CPU":
        return
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    # msrun exports the job's worker count; on CPU jobs are single-node, so all of them are local.
    workers = int(os.environ.get("MS_WORKER_NUM", "1") or 1) if os.environ.get("MS_ROLE") else 1
    threads = max(1, available_cores() // max(1, workers))
    ms.set_context(runtime_num_threads=threads)


def adapt_to_device(config: MindFormerConfig, explicit_target: bool = False) -> str:
    """Resolve the device and make the config runnable there; returns the device target.

    Call before ``build_context``. ``explicit_target``: the user chose ``--device_target``.
    """
    target = _resolve_device_target(config, explicit_target)
    _adapt_parallel(config, target)
    _adapt_wrapper(config, target)
    _adapt_optimizer(config, target)
    _adapt_dtypes(config, target)
    _adapt_checkpoint(config)
    _adapt_dataset_workers(config)
    _adapt_threads(target)
    return target
