"""GPT-2 style byte-level BPE tokenizer (StarCoder / WizardCoder family) for MindFormers.

Loads either a Hugging Face ``tokenizer.json`` or the classic ``vocab.json`` + ``merges.txt`` pair.
A ``tokenizer.json`` is preferred whenever one is available (given explicitly, or lying next to the
given ``vocab.json``): it carries the full pre-tokenizer. When only ``vocab.json`` + ``merges.txt``
exist, the pre-tokenizer is rebuilt as StarCoder's (digits split one by one, then GPT-2's byte-level
regex) unless ``split_digits=False``; plain GPT-2 BPE without the digit split encodes numbers
differently from StarCoder.
"""
from typing import List, Optional, Sequence, Tuple

from mindformers.models.tokenization_utils_fast import PreTrainedTokenizerFast

from .backend import build_byte_level_bpe, load_byte_level_source, template_post_processor
from .paths import none_if_unset, save_tokenizer_json

__all__ = ["ByteLevelBPETokenizer", "build_byte_level_bpe"]


class ByteLevelBPETokenizer(PreTrainedTokenizerFast):
    """Byte-level BPE tokenizer on MindFormers' ``PreTrainedTokenizerFast``.

    Model packages subclass it and set ``default_tokenizer`` (a shipped tokenizer used when no file
    is given), ``default_special_tokens`` and default special-token arguments.

    Args:
        vocab_file / merges_file: GPT-2 style vocabulary and merges (``merge_file`` is accepted as an
            alias, as upstream MindFormers YAMLs spell it). ``vocab_file`` may also be a directory.
        tokenizer_file: a ``tokenizer.json`` (or a directory, or a shipped tokenizer name); wins over
            vocab/merges.
        add_bos_token / add_eos_token: add BOS / EOS on encode (default: neither).
        split_digits: StarCoder's digit pre-split when building from vocab/merges.
    """

    vocab_files_names = {}  # see DeepSeekCoderTokenizer: keeps build_tokenizer from demanding vocab_file
    slow_tokenizer_class = None
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    default_tokenizer: Optional[str] = None
    default_special_tokens: Sequence[str] = ()

    def __init__(
            self,
            vocab_file: Optional[str] = None,
            merges_file: Optional[str] = None,
            tokenizer_file: Optional[str] = None,
            unk_token: Optional[str] = None,
            bos_token: Optional[str] = None,
            eos_token: Optional[str] = None,
            pad_token: Optional[str] = None,
            add_bos_token: bool = False,
            add_eos_token: bool = False,
            split_digits: bool = True,
            clean_up_tokenization_spaces: bool = False,
            **kwargs,
    ):
        merges_file = none_if_unset(merges_file) or none_if_unset(kwargs.pop("merge_file", None))
        if kwargs.pop("add_prefix_space", False):
            raise ValueError(f"{type(self).__name__}: add_prefix_space=True is not supported (StarCoder uses False)")
        kwargs.pop("tokenizer_object", None)
        self._source_file = None
        backend = self._load_backend(tokenizer_file, vocab_file, merges_file, split_digits)
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)
        super().__init__(
            tokenizer_object=backend,
            unk_token=none_if_unset(unk_token),
            bos_token=none_if_unset(bos_token),
            eos_token=none_if_unset(eos_token),
            pad_token=none_if_unset(pad_token),
            add_bos_token=self._add_bos_token,
            add_eos_token=self._add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.tokenizer_file = self._source_file  # the tokenizer.json used; None when built from vocab/merges
        self._default_post_processor = self._tokenizer.post_processor
        self.update_post_processor()

    def _load_backend(self, tokenizer_file, vocab_file, merges_file, split_digits):
        """Pick the source files (see the module docstring for the order) and build the backend."""
        backend, self._source_file = load_byte_level_source(tokenizer_file, vocab_file, merges_file, split_digits,
                                                            self.default_tokenizer, self.default_special_tokens,
                                                            type(self).__name__)
        return backend

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool):
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool):
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self):
        """Add BOS / EOS through a template post-processor when asked; else keep the file's own."""
        if not hasattr(self, "_default_post_processor"):
            return  # called by a setter during the base class's __init__
        if not (self._add_bos_token or self._add_eos_token):
            self._tokenizer.post_processor = self._default_post_processor
            return
        self._tokenizer.post_processor = template_post_processor(self.bos_token, self.bos_token_id, self.eos_token,
                                                                 self.eos_token_id, self._add_bos_token,
                                                                 self._add_eos_token)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int],
                                         token_ids_1: Optional[List[int]] = None) -> List[int]:
        bos = [self.bos_token_id] if self._add_bos_token else []
        eos = [self.eos_token_id] if self._add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        """Write the backend as ``tokenizer.json`` (it keeps the digit split that vocab/merges lack)."""
        return save_tokenizer_json(self, save_directory, filename_prefix)
