"""DeepSeek-Coder v1.5 (and v1): config, model, tokenizer, preprocessing and conversion."""
from research.deepseek1_5.deepseek1_5_config import PRESETS, DeepSeekCoderConfig
from research.deepseek1_5.deepseek1_5 import DeepSeekCoderForCausalLM
from research.deepseek1_5.deepseek_tokenizer import DeepSeekCoderTokenizer
from mindformers_ext.families import Family, register_family
from mindformers_ext.models.llama_hf_config import llama_kwargs_from_hf

register_family(Family("deepseek_coder", DeepSeekCoderConfig, DeepSeekCoderForCausalLM, DeepSeekCoderTokenizer,
                       hf_model_type="llama", config_from_hf=llama_kwargs_from_hf, weight_map="deepseek"))

__all__ = ["PRESETS", "DeepSeekCoderConfig", "DeepSeekCoderForCausalLM", "DeepSeekCoderTokenizer"]
