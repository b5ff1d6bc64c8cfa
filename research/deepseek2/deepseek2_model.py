"""Upstream MindFormers' module name for the DeepSeek-V2 model (v1.5.0 YAMLs say
``auto_register: deepseek2_model.DeepseekV2ForCausalLM`` with ``--register_path research/deepseek2``).

A re-export, not the definitions: MindFormers' ``auto_register`` loads this file by path under another
module name, so classes defined here would be a second copy registered over ours. The whole model
(MLA, MoE, decoder, causal LM, as upstream's v1.5.0 module held them) is in ``deepseek2.py``;
its classes are registered when ``research.deepseek2`` is imported (``mindformers_ext.load_families()``).
"""
from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
from research.deepseek2.deepseek2_config import DeepseekV2Config

__all__ = ["DeepseekV2ForCausalLM", "DeepseekV2Config"]
