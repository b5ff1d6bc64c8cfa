"""Reading the model config a conversion checks shapes against: an HF config.json or our YAML."""
from __future__ import annotations

import json
import os
from typing import Any

from mindformers_ext.convert.errors import ConversionError
from mindformers_ext.convert.weight_map import WeightMap, check_map_config


def load_config(config: Any, wmap: WeightMap) -> dict:
    """An HF config dict for ``wmap`` from a path (HF ``config.json``, a directory holding one, or our
    MindFormers YAML, whose ``model.model_config`` is used), a dict, or a config object."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: config file not found")
        if path.endswith((".yaml", ".yml")):
            config = _model_config_from_yaml(path)
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
    check_model_type(wmap, config, "the config")
    return check_map_config(wmap, config)


def check_model_type(wmap: WeightMap, config: Any, where: str) -> None:
    """Refuse an HF config whose ``model_type`` is not one the map converts (a wrong ``--model``)."""
    kind = config.get("model_type") if isinstance(config, dict) else None
    if not kind or not wmap.model_types or kind in wmap.model_types:
        return
    from mindformers_ext.convert.registry import MODEL_TYPES  # pylint: disable=import-outside-toplevel
    hint = f"; for this checkpoint use --model {MODEL_TYPES[kind]}" if kind in MODEL_TYPES else ""
    raise ConversionError(f"{where}: model_type {kind!r} is not a {wmap.name} checkpoint (--model {wmap.name} "
                          f"expects model_type {' / '.join(map(repr, wmap.model_types))}){hint}")


def _model_config_from_yaml(path: str) -> dict:
    import yaml  # pylint: disable=import-outside-toplevel
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path}: cannot read the YAML: {exc}") from exc
    model_config = (doc or {}).get("model", {}).get("model_config") if isinstance(doc, dict) else None
    if not isinstance(model_config, dict):
        raise ConversionError(f"{path}: no model.model_config section")
    return dict(model_config)
