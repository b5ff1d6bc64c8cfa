"""Model families: one record each, read by everything that goes from a name to our classes.

A research package (``research/deepseek1_5``, ``research/deepseek2``, ``research/wizardcoder``)
registers its :class:`Family` when it is imported: its config, model and tokenizer classes (also
registered in MindFormers' registry under their YAML ``type:`` names by the classes' decorators), the
HF ``model_type`` it loads and how to read that config, and the converter's weight map.
``load_hf_model``, the server and the YAML runner look families up here. Arrows point one way:
research imports mindformers_ext; mindformers_ext imports the research packages only when a family
is first asked for (:func:`load_families`, which the tools call), never at import time.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

PACKAGES = ("research.deepseek1_5", "research.deepseek2", "research.wizardcoder")

_FAMILIES: dict[str, "Family"] = {}


@dataclass(frozen=True)
class Family:
    """One model family. ``name`` is its configs' ``model_type`` (what the FIM / chat helpers key on);
    ``hf_model_type`` the HF ``config.json`` model_type it loads, ``config_from_hf(hf_config, source)``
    the keyword arguments of ``config_class`` for it; ``weight_map`` the converter's ``--model`` name;
    ``config_to_hf(config)`` the HF ``config.json`` dict of one of our configs, where the family's
    weight map does not build it itself."""
    name: str
    config_class: type
    model_class: type
    tokenizer_class: type
    hf_model_type: str
    config_from_hf: Callable[[dict, str], dict]
    weight_map: str
    config_to_hf: Optional[Callable[[Any], dict]] = None


def register_family(family: Family) -> Family:
    """Add ``family`` (a research package calls this when it is imported). Also registers our train
    wrapper and optimizer in MindFormers' registry (``mindformers_ext.runner``), which the family's
    finetune YAMLs name."""
    importlib.import_module("mindformers_ext.runner").register()
    _FAMILIES[family.name] = family
    return family


def load_families() -> dict[str, Family]:
    """Every family, importing the research packages not imported yet (which registers their classes
    in MindFormers' registry too, so YAML ``type:`` names resolve)."""
    for package in PACKAGES:
        if package not in sys.modules:
            importlib.import_module(package)
    return dict(_FAMILIES)


def family_for_weight_map(weight_map: str) -> Family:
    """The family whose checkpoints the converter's weight map ``weight_map`` converts."""
    found = {f.weight_map: f for f in load_families().values()}
    if weight_map not in found:
        raise ValueError(f"no model family uses the weight map {weight_map!r}; expected one of {sorted(found)}")
    return found[weight_map]


def family_for_hf_model_type(model_type: Any, source: str = "config.json") -> Family:
    """The family that loads HF checkpoints of ``model_type``."""
    found = {f.hf_model_type: f for f in load_families().values()}
    if model_type not in found:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of {sorted(found)}")
    return found[model_type]
