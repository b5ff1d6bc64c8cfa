"""DeepSeek tokenizer (DeepSeek-Coder v1, DeepSeek-Coder-7B-v1.5, DeepSeek-V2).

All of them are byte-level BPE tokenizers serialised as a Hugging Face ``tokenizer.json``, loaded
through MindFormers' ``LlamaTokenizerFast`` machinery (BOS prepended by a template post-processor,
like Hugging Face's ``LlamaTokenizerFast`` that DeepSeek's own ``tokenizer_config.json`` names).

Special tokens:

==========================  =================  ==================
token                       v1 (32022 tokens)  v1.5 / V2 (100015)
==========================  =================  ==================
``<｜begin▁of▁sentence｜>``    32013 (bos)        100000 (bos)
``<｜end▁of▁sentence｜>``      32014 (eos)        100001 (eos, base)
``<|EOT|>``                  32021              100015 (added here)
==========================  =================  ==================

Instruct models end a turn with ``<|EOT|>``: their YAMLs set ``eos_token: "<|EOT|>"``. The v1.5 /
V2 vocabulary file stops at 100014, so this class adds ``<|EOT|>`` as a special token (it gets id
100015, the id DeepSeek's instruct model uses). ``unk_token`` stays None: the BPE has no unknown
token, and naming one would add a spurious ``<unk>`` to the vocabulary.
"""
from typing import List, Optional, Tuple

from mindformers.models.llama.llama_tokenizer_fast import LlamaTokenizerFast
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .backend import DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_EOT, TOKENIZER_FILE, load_deepseek_source
from .paths import none_if_unset, resolve_file, save_tokenizer_json

__all__ = ["DeepSeekCoderTokenizer", "DEEPSEEK_BOS", "DEEPSEEK_EOS", "DEEPSEEK_EOT"]


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class DeepSeekCoderTokenizer(LlamaTokenizerFast):
    """DeepSeek byte-level BPE tokenizer loaded from a ``tokenizer.json``.

    Args:
        tokenizer_file: a ``tokenizer.json``, a directory holding one, or the name of a shipped
            tokenizer (``deepseek-llm`` for v1.5 / V2, ``deepseek-coder`` for v1). Default: the
            shipped ``deepseek-llm`` file, so predict works offline.
        vocab_file: accepted as an alias of ``tokenizer_file`` (MindFormers YAMLs often only set
            ``vocab_file``); ignored when ``tokenizer_file`` is given.
        bos_token / eos_token / pad_token: special token strings. Instruct models: ``eos_token:
            "<|EOT|>"``.
        unk_token: keep None.
        add_bos_token: prepend BOS on encode (default True, as DeepSeek's tokenizer does).
        add_eos_token: append EOS on encode (default False).
        eot_token: end-of-turn token to ensure in the vocabulary (added as a special token when the
            file lacks it); None to skip.
    """

    # Empty on purpose: MindFormers' build_tokenizer demands a `vocab_file` key for classes that
    # declare vocab files, which would make `type: DeepSeekCoderTokenizer` alone (shipped default)
    # fail. from_pretrained(<dir>) still finds tokenizer.json through the base class.
    vocab_files_names = {}
    slow_tokenizer_class = None

    def __init__(
            self,
            vocab_file: Optional[str] = None,
            tokenizer_file: Optional[str] = None,
            clean_up_tokenization_spaces: bool = False,
            unk_token: Optional[str] = None,
            bos_token: str = DEEPSEEK_BOS,
            eos_token: str = DEEPSEEK_EOS,
            pad_token: Optional[str] = DEEPSEEK_EOS,
            add_bos_token: bool = True,
            add_eos_token: bool = False,
            eot_token: Optional[str] = DEEPSEEK_EOT,
            additional_special_tokens: Optional[List[str]] = None,
            **kwargs,
    ):
        path = resolve_file(tokenizer_file, "tokenizer_file", TOKENIZER_FILE)
        if path is None:
            path = resolve_file(vocab_file, "vocab_file", TOKENIZER_FILE)
        path = load_deepseek_source(path)
        kwargs.pop("legacy", None)
        eot_token = none_if_unset(eot_token)
        additional = [str(t) for t in (additional_special_tokens or [])]
        if eot_token is not None and eot_token not in additional:
            additional.append(eot_token)
        super().__init__(
            vocab_file=None,
            tokenizer_file=path,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            unk_token=none_if_unset(unk_token),
            bos_token=none_if_unset(bos_token),
            eos_token=none_if_unset(eos_token),
            pad_token=none_if_unset(pad_token),
            add_bos_token=bool(add_bos_token),
            add_eos_token=bool(add_eos_token),
            additional_special_tokens=additional,
            legacy=True,
            **kwargs,
        )
        self.tokenizer_file = path
        self.eot_token = eot_token

    @property
    def eot_token_id(self) -> Optional[int]:
        """Id of the end-of-turn token (``<|EOT|>``), or None when disabled."""
        if self.eot_token is None:
            return None
        return self.convert_tokens_to_ids(self.eot_token)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        """Write the backend as ``tokenizer.json`` (there is no slow vocabulary to save)."""
        return save_tokenizer_json(self, save_directory, filename_prefix)

