"""WizardCoder-15B (GPT-BigCode / StarCoder): config, model, tokenizer, preprocessing, conversion, export."""
from research.wizardcoder.wizardcoder_config import PRESETS, WizardCoderConfig
from research.wizardcoder.wizardcoder import WizardCoderForCausalLM, WizardCoderLMHeadModel, WizardCoderProcessor
from research.wizardcoder.wizardcoder_tokenizer import WizardCoderTokenizer
from mindformers_ext.families import Family, register_family
from mindformers_ext.models.gpt_bigcode_config import gpt_bigcode_kwargs_from_hf

register_family(Family("wizardcoder", WizardCoderConfig, WizardCoderForCausalLM, WizardCoderTokenizer,
                       hf_model_type="gpt_bigcode", config_from_hf=gpt_bigcode_kwargs_from_hf, weight_map="wizardcoder"))

__all__ = ["PRESETS", "WizardCoderConfig", "WizardCoderForCausalLM", "WizardCoderLMHeadModel",
           "WizardCoderProcessor", "WizardCoderTokenizer"]
