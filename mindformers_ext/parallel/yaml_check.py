"""Run the static parallel check on a MindFormers YAML (model + parallel_config), weights unallocated."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

from mindformers_ext.parallel.check import build_skeleton, check_parallel
from mindformers_ext.parallel.shard import parallel_sizes, recompute_layers


def _plain(value):
    """MindFormerConfig nodes to plain dicts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load_checked_yaml(path: str) -> MindFormerConfig:
    """The YAML as the runner reads it: upstream MindFormers' spellings translated
    (:func:`mindformers_ext.upstream.translate_config`: type names, top-level ``moe_config`` passed to
    the model config, vocabularies that model parallel does not divide replicated)."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.runner.config import load_yaml
    from mindformers_ext.upstream import translate_config

    raw = load_yaml(path)
    translate_config(raw, path)
    return MindFormerConfig(**raw)


def check_yaml(path: str, device_num: Optional[int] = None) -> list[str]:
    """Check the YAML at ``path`` for ``device_num`` devices (default: dp x mp x pp of its parallel_config), and
    its ``recompute_config`` as it applies on Ascend (a line says how many layers each stage recomputes)."""
    from mindformers_ext.families import load_families
    load_families()  # the research packages' classes in MindFormers' registry

    yaml = load_checked_yaml(path)
    model = yaml.get("model")
    if not model or "model_config" not in model or "arch" not in model:
        raise KeyError(f"{path}: expected model.model_config and model.arch sections")
    model_config = _plain(model.model_config)
    config_type = model_config.pop("type", None)
    model_config["checkpoint_name_or_path"] = ""  # a layout check builds the cells only, never loads weights
    arch_type = _plain(model.arch).get("type")
    parallel = _plain(yaml.get("parallel_config") or {})
    model_config["parallel_config"] = parallel
    try:
        config_cls = MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, config_type)
        model_cls = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch_type)
    except (ValueError, KeyError) as err:
        raise KeyError(f"{path}: model types {config_type!r} / {arch_type!r} are not registered: {err}") from err
    batch = _plain(yaml.get("runner_config") or {}).get("batch_size") or model_config.get("batch_size") or 1
    model_config["batch_size"] = batch
    if not any(str(getattr(c, "__module__", "")).startswith(("mindformers_ext", "research"))
               for c in getattr(model_cls, "__mro__", ())):  # ours, or a subclass of ours (--register_path)
        raise ValueError(f"{path}: model.arch.type {arch_type!r} is MindFormers' own {model_cls.__module__}."
                         f"{model_cls.__name__}, whose shard strategies this check cannot read; use one of this "
                         "project's models (e.g. DeepSeekCoderForCausalLM, DeepseekV2ForCausalLM, "
                         "WizardCoderForCausalLM)")
    try:
        config = config_cls(**model_config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: model.model_config ({config_type}"
                         f"{', with moe_config' if 'moe_config' in model_config else ''}): {err}") from err
    skeleton = build_skeleton(model_cls, config)
    dp, mp, pp, _ = parallel_sizes(parallel)
    if device_num is None:
        device_num = dp * mp * pp
    lines = check_parallel(skeleton, device_num, batch_size=batch, micro_batch_num=parallel.get("micro_batch_num", 1))
    recompute = _plain(yaml.get("recompute_config") or {})
    if recompute:
        settings = SimpleNamespace(parallel_config=SimpleNamespace(recompute=recompute), offset=config.offset)
        try:
            whole, attention = recompute_layers(skeleton.model.layers, settings, pp, device_target="Ascend")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        if any(whole) or any(attention):
            lines.append(f"recompute per pipeline stage: {whole} layers whole, {attention} attention cores")
    return lines
