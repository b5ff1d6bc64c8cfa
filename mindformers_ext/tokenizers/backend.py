"""Our tokenizers' configured ``tokenizers.Tokenizer`` backends, built without MindFormers.

The MindFormers tokenizer classes (:class:`DeepSeekCoderTokenizer`, :class:`ByteLevelBPETokenizer`)
need ``import mindformers`` (about 4 s on 2 cores, a third of preprocessing 20k samples). The
preprocessing CLIs only encode and look up a few tokens, so they use a :class:`BackendTokenizer`
from :func:`deepseek_backend` / :func:`byte_level_backend`: the same backend the class builds, from
the same files and special tokens (``tests/test_tokenizers.py`` compares the serialised state and
the encodings of both).
"""
import json
import os
from typing import Dict, List, Optional, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .paths import none_if_unset, resolve_file, tokenizer_path

__all__ = ["BackendTokenizer", "deepseek_backend", "byte_level_backend", "load_byte_level_source",
           "build_byte_level_bpe", "template_post_processor", "DEEPSEEK_BOS", "DEEPSEEK_EOS", "DEEPSEEK_EOT",
           "STARCODER_SPECIAL_TOKENS", "ENDOFTEXT", "PAD"]

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
DEEPSEEK_EOT = "<|EOT|>"
DEEPSEEK_DEFAULT_TOKENIZER = "deepseek-llm"

ENDOFTEXT = "<|endoftext|>"
PAD = "[PAD]"
STARCODER_SPECIAL_TOKENS = (
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
)


class BackendTokenizer:
    """A configured ``tokenizers.Tokenizer`` with the lookups preprocessing uses (as the fast tokenizer
    classes name them)."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend_tokenizer = backend

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        return self.backend_tokenizer.token_to_id(token)

    def convert_ids_to_tokens(self, index: int) -> Optional[str]:
        return self.backend_tokenizer.id_to_token(index)


def template_post_processor(bos: Optional[str], bos_id: Optional[int], eos: Optional[str], eos_id: Optional[int],
                            add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """BOS / EOS around each sequence, as Hugging Face's ``LlamaTokenizerFast.update_post_processor``."""
    if add_bos and bos is None:
        raise ValueError("add_bos_token is set but bos_token is None")
    if add_eos and eos is None:
        raise ValueError("add_eos_token is set but eos_token is None")
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(special)))


def _set_template(backend: Tokenizer, bos: Optional[str], eos: Optional[str], add_bos: bool, add_eos: bool) -> None:
    """:func:`template_post_processor` with the backend's own ids of ``bos`` / ``eos``."""
    backend.post_processor = template_post_processor(bos, backend.token_to_id(bos) if bos else None, eos,
                                                     backend.token_to_id(eos) if eos else None,
                                                     bool(add_bos), bool(add_eos))


def _add_special_tokens(backend: Tokenizer, tokens: Sequence[Optional[str]]) -> None:
    """Register ``tokens`` as special added tokens (matched whole; new ones get the next ids), as the
    fast tokenizer classes do with their special-token arguments; a token the file already lists as
    an added token keeps its flags."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    for token in dict.fromkeys(t for t in tokens if t is not None and t not in added):
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])


def deepseek_backend(tokenizer_file: Optional[str] = None, bos_token: Optional[str] = DEEPSEEK_BOS,
                     eos_token: Optional[str] = DEEPSEEK_EOS, pad_token: Optional[str] = DEEPSEEK_EOS,
                     add_bos_token: bool = True, add_eos_token: bool = False,
                     eot_token: Optional[str] = DEEPSEEK_EOT) -> BackendTokenizer:
    """The backend of ``DeepSeekCoderTokenizer(tokenizer_file=..., ...)`` (same arguments and defaults)."""
    path = load_deepseek_source(tokenizer_file)
    backend = Tokenizer.from_file(path)
    bos, eos, pad, eot = (none_if_unset(t) for t in (bos_token, eos_token, pad_token, eot_token))
    _add_special_tokens(backend, (bos, eos, pad, eot))
    _set_template(backend, bos, eos, add_bos_token, add_eos_token)
    return BackendTokenizer(backend)


def load_deepseek_source(tokenizer_file: Optional[str]) -> str:
    """The ``tokenizer.json`` a DeepSeek tokenizer reads: the given file, directory or shipped name,
    else the shipped ``deepseek-llm``."""
    path = resolve_file(tokenizer_file, "tokenizer_file", TOKENIZER_FILE)
    if path is None:
        path = resolve_file(tokenizer_path(DEEPSEEK_DEFAULT_TOKENIZER), "tokenizer_file", TOKENIZER_FILE)
    if not path.endswith(".json"):
        raise ValueError(f"DeepSeek tokenizers read a Hugging Face tokenizer.json, got {path!r}")
    return path


def build_byte_level_bpe(vocab_file: str, merges_file: str, special_tokens: Sequence[str] = (),
                         split_digits: bool = True) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` from ``vocab.json`` + ``merges.txt``.

    ``special_tokens`` that are in the vocabulary are registered as special added tokens so that
    they are matched whole (``<fim_prefix>`` must not be split into ``<``, ``fim``, ...). An
    ``added_tokens.json`` next to ``vocab.json`` (Hugging Face's slow-tokenizer layout, for example
    WizardCoder's ``[PAD]`` = 49152) is appended in id order.
    """
    for key, path in (("vocab_file", vocab_file), ("merges_file", merges_file)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}={path!r}: no such file")
    try:
        tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"cannot build a BPE from vocab_file={vocab_file!r} and merges_file={merges_file!r}: "
                         f"{err}") from err
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    vocab = tok.get_vocab()
    present = [t for t in special_tokens if t in vocab]
    if present:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
    added_path = os.path.join(os.path.dirname(vocab_file), ADDED_TOKENS_FILE)
    if os.path.isfile(added_path):
        with open(added_path, encoding="utf-8") as handle:
            try:
                added: Dict[str, int] = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{added_path}: invalid JSON: {err}") from err
        for token, index in sorted(added.items(), key=lambda item: item[1]):
            if token in vocab or token in tok.get_vocab():
                continue
            if index != tok.get_vocab_size():
                raise ValueError(f"{added_path}: token {token!r} has id {index}, expected the next free id "
                                 f"{tok.get_vocab_size()}")
            tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return tok


def load_byte_level_source(tokenizer_file: Optional[str], vocab_file: Optional[str], merges_file: Optional[str],
                           split_digits: bool, default_tokenizer: Optional[str],
                           special_tokens: Sequence[str], owner: str) -> tuple:
    """(backend, the tokenizer.json read or None) of a byte-level BPE tokenizer: ``tokenizer_file``,
    else a ``tokenizer.json`` next to ``vocab_file``, else ``vocab_file`` + ``merges_file`` (``merges.txt``
    next to the vocabulary when not given), else the shipped ``default_tokenizer``. ``owner`` names the
    tokenizer in errors."""
    path = resolve_file(tokenizer_file, "tokenizer_file", TOKENIZER_FILE)
    vocab = None
    if path is None and none_if_unset(vocab_file) is not None:
        vocab = resolve_file(vocab_file, "vocab_file", VOCAB_FILE)
        sibling = os.path.join(os.path.dirname(vocab), TOKENIZER_FILE)
        if os.path.isfile(sibling):
            path = sibling
    if path is None and vocab is None:
        if default_tokenizer is None:
            raise ValueError(f"{owner}: give tokenizer_file, or vocab_file and merges_file")
        path = os.path.join(tokenizer_path(default_tokenizer), TOKENIZER_FILE)
    if path is not None:
        try:
            return Tokenizer.from_file(path), path
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"tokenizer_file={path!r}: cannot load: {err}") from err
    if none_if_unset(merges_file) is None:
        candidate = os.path.join(os.path.dirname(vocab), MERGES_FILE)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"vocab_file={vocab!r} given without merges_file (merge_file), "
                                    f"and there is no {MERGES_FILE} next to it")
        merges_file = candidate
    merges = resolve_file(merges_file, "merges_file", MERGES_FILE)
    return build_byte_level_bpe(vocab, merges, special_tokens, split_digits), None


def byte_level_backend(tokenizer_file: Optional[str] = None, vocab_file: Optional[str] = None,
                       merges_file: Optional[str] = None, unk_token: Optional[str] = ENDOFTEXT,
                       bos_token: Optional[str] = ENDOFTEXT, eos_token: Optional[str] = ENDOFTEXT,
                       pad_token: Optional[str] = PAD, add_bos_token: bool = False, add_eos_token: bool = False,
                       split_digits: bool = True, default_tokenizer: Optional[str] = "wizardcoder",
                       special_tokens: Sequence[str] = STARCODER_SPECIAL_TOKENS) -> BackendTokenizer:
    """The backend of ``WizardCoderTokenizer(...)`` (its defaults; other ``ByteLevelBPETokenizer``
    subclasses pass their own ``default_tokenizer`` / ``special_tokens``)."""
    backend, _ = load_byte_level_source(tokenizer_file, vocab_file, merges_file, split_digits, default_tokenizer,
                                        special_tokens, "byte-level BPE tokenizer")
    unk, bos, eos, pad = (none_if_unset(t) for t in (unk_token, bos_token, eos_token, pad_token))
    _add_special_tokens(backend, (bos, eos, unk, pad))
    if add_bos_token or add_eos_token:
        _set_template(backend, bos, eos, add_bos_token, add_eos_token)
    return BackendTokenizer(backend)
