"""WizardCoder tokenizer: StarCoder-1 byte-level BPE (49152 tokens) plus ``[PAD]`` = 49152.

YAML::

    processor:
      tokenizer:
        type: WizardCoderTokenizer
        vocab_file: /path/vocab.json      # or tokenizer_file: /path/tokenizer.json
        merge_file: /path/merges.txt      # upstream's spelling; merges_file works too

With no file given it loads the shipped copy (``mindformers_ext/tokenizers/data/wizardcoder``).
A ``tokenizer.json`` next to ``vocab.json`` is preferred (it carries StarCoder's digit split).
eos = ``<|endoftext|>`` (0), pad = ``[PAD]`` (49152); no BOS is added on encode.
"""
from typing import Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.tokenizers.backend import ENDOFTEXT, PAD, STARCODER_SPECIAL_TOKENS
from mindformers_ext.tokenizers.byte_level_bpe import ByteLevelBPETokenizer

__all__ = ["WizardCoderTokenizer", "STARCODER_SPECIAL_TOKENS", "ENDOFTEXT", "PAD"]


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class WizardCoderTokenizer(ByteLevelBPETokenizer):
    """WizardCoder-15B tokenizer (see the module docstring); arguments as ByteLevelBPETokenizer."""

    default_tokenizer = "wizardcoder"
    default_special_tokens = STARCODER_SPECIAL_TOKENS

    def __init__(
            self,
            vocab_file: Optional[str] = None,
            merges_file: Optional[str] = None,
            tokenizer_file: Optional[str] = None,
            unk_token: Optional[str] = ENDOFTEXT,
            bos_token: Optional[str] = ENDOFTEXT,
            eos_token: Optional[str] = ENDOFTEXT,
            pad_token: Optional[str] = PAD,
            add_bos_token: bool = False,
            add_eos_token: bool = False,
            **kwargs,
    ):
        super().__init__(vocab_file=vocab_file, merges_file=merges_file, tokenizer_file=tokenizer_file,
                         unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)
