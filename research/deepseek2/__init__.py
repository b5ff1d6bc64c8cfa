"""DeepSeek-V2 / V2-Lite: MLA attention, DeepSeekMoE, YaRN; config, model, tokenizer and conversion."""
from mindformers_ext.tokenizers import DeepSeekCoderTokenizer
from research.deepseek2.deepseek2_config import PRESETS, DeepseekV2Config
from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
from research.deepseek2.deepseek2_hf_config import deepseek2_config_to_hf, deepseek2_kwargs_from_hf
from mindformers_ext.families import Family, register_family

register_family(Family(DeepseekV2Config.model_type, DeepseekV2Config, DeepseekV2ForCausalLM, DeepSeekCoderTokenizer,
                       hf_model_type="deepseek_v2", config_from_hf=deepseek2_kwargs_from_hf, weight_map="deepseek2",
                       config_to_hf=deepseek2_config_to_hf))

__all__ = ["PRESETS", "DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepSeekCoderTokenizer"]
