"""Upstream MindFormers' module name for the DeepSeek-V2 model (v1.5.0 YAMLs say
``auto_register: deepseek2_model.DeepseekV2ForCausalLM`` with ``--register_path research/deepseek2``).

A thin re-export: the model is :class:`research.deepseek2.deepseek2.DeepseekV2ForCausalLM`, registered
in MindFormers when ``research.deepseek2`` (or ``mindformers_ext``) is imported. Upstream's v1.5.0
module also held the MLA / MoE layers; ours live in ``deepseek2_transformer.py`` / ``deepseek2_layer.py``.
"""
from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
from research.deepseek2.deepseek2_config import DeepseekV2Config

__all__ = ["DeepseekV2ForCausalLM", "DeepseekV2Config"]
