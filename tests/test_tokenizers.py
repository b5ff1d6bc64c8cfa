"""Shipped tokenizers: reference encodings, special tokens, round trips, MindFormers registry."""
import os
import shutil
import sysconfig
import tempfile

import numpy as np

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_test_logs"))

import pytest  # noqa: E402

import mindformers_ext.tokenizers as tokenizers_pkg  # noqa: E402

from mindformers_ext.tokenizers import (SHIPPED_TOKENIZERS, DeepSeekCoderTokenizer,  # noqa: E402
                                        tokenizer_path)
from research.wizardcoder.wizardcoder_tokenizer import WizardCoderTokenizer  # noqa: E402

VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tokenizer_vectors")
SEPARATOR = "\n__ggml_vocab_test__\n"


def load_vectors(name):
    """(text, ids) pairs of llama.cpp's test-tokenizer-0 files: every text is followed by the separator
    line, and the .out file has one line of space-separated ids per text (no BOS)."""
    with open(os.path.join(VECTORS, name + ".inp"), encoding="utf-8", newline="") as handle:
        content = handle.read()
    assert content.endswith(SEPARATOR)
    texts = content[:-len(SEPARATOR)].split(SEPARATOR)
    with open(os.path.join(VECTORS, name + ".out"), encoding="utf-8") as handle:
        ids = [[int(x) for x in line.split()] for line in handle.read().split("\n")[:len(texts)]]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids))


@pytest.fixture(scope="module")
def deepseek_llm():
    return DeepSeekCoderTokenizer()  # default: the shipped deepseek-llm file


@pytest.fixture(scope="module")
def deepseek_coder():
    return DeepSeekCoderTokenizer(tokenizer_file="deepseek-coder")


@pytest.fixture(scope="module")
def wizardcoder():
    return WizardCoderTokenizer()  # default: the shipped tokenizer.json


@pytest.fixture(scope="module")
def wizardcoder_from_vocab(tmp_path_factory):
    """Built from vocab.json + merges.txt alone (no tokenizer.json beside them)."""
    src = tokenizer_path("wizardcoder")
    dst = tmp_path_factory.mktemp("wizard_vocab")
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(os.path.join(src, name), dst / name)
    tok = WizardCoderTokenizer(vocab_file=str(dst / "vocab.json"), merge_file=str(dst / "merges.txt"))
    assert tok.tokenizer_file is None
    return tok


def test_shipped_paths():
    for name in SHIPPED_TOKENIZERS:
        assert os.path.isfile(os.path.join(tokenizer_path(name), "tokenizer.json"))
        # the shipped copies live inside the package (package_data), not in ../shared
        package_dir = os.path.dirname(os.path.abspath(tokenizers_pkg.__file__))
        assert os.path.commonpath([tokenizer_path(name), package_dir]) == package_dir
    for name in ("vocab.json", "merges.txt"):
        assert os.path.isfile(os.path.join(tokenizer_path("wizardcoder"), name))
    with pytest.raises(KeyError, match="unknown shipped tokenizer"):
        tokenizer_path("llama")


@pytest.mark.parametrize("vectors, fixture", [
    ("deepseek-llm", "deepseek_llm"),
    ("deepseek-coder", "deepseek_coder"),
    ("starcoder", "wizardcoder"),
    ("starcoder", "wizardcoder_from_vocab"),
])
def test_reference_vectors(vectors, fixture, request):
    tok = request.getfixturevalue(fixture)
    failures = []
    for text, expected in load_vectors(vectors):
        got = tok.encode(text, add_special_tokens=False)
        if got != expected:
            failures.append((text, expected, got))
        elif tok.decode(got) != text:
            failures.append((text, "decode", tok.decode(got)))
    assert not failures, f"{len(failures)}/46 differ, first: {failures[0]!r}"


def test_deepseek_v1_5_special_tokens(deepseek_llm):
    tok = deepseek_llm
    assert (tok.bos_token_id, tok.eos_token_id, tok.eot_token_id) == (100000, 100001, 100015)
    assert tok.unk_token is None and len(tok) == 100016
    ids = tok("def f():\n    pass")["input_ids"]
    assert ids[0] == 100000 and ids.count(100000) == 1  # BOS prepended once
    assert tok.encode("x<|EOT|>", add_special_tokens=False)[-1] == 100015  # matched whole
    assert tok.decode(tok.encode("a<|EOT|>"), skip_special_tokens=True) == "a"
    tok.add_bos_token = False
    try:
        assert tok("def")["input_ids"][0] != 100000
    finally:
        tok.add_bos_token = True
    instruct = DeepSeekCoderTokenizer(eos_token="<|EOT|>")
    assert instruct.eos_token_id == 100015 and len(instruct) == 100016


def test_deepseek_v1_special_tokens(deepseek_coder):
    tok = deepseek_coder
    assert (tok.bos_token_id, tok.eos_token_id, tok.eot_token_id) == (32013, 32014, 32021)
    assert len(tok) == 32022  # <|EOT|> already in the file, nothing added
    assert tok("a")["input_ids"][0] == 32013


def test_deepseek_matches_hf_llama_fast(deepseek_llm):
    """Encode with BOS exactly like Hugging Face's LlamaTokenizerFast on the same file."""
    from transformers import LlamaTokenizerFast
    path = os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json")
    hf = LlamaTokenizerFast(tokenizer_file=path, unk_token=None, bos_token="<｜begin▁of▁sentence｜>",
                            eos_token="<｜end▁of▁sentence｜>", legacy=True)
    text = "import numpy as np\n\nx = np.arange(10)  # 10 numbers\nprint(x[::2], 'тест', 你好)\n"
    assert deepseek_llm(text)["input_ids"] == hf(text)["input_ids"]


def test_wizardcoder_special_tokens(wizardcoder, wizardcoder_from_vocab):
    for tok in (wizardcoder, wizardcoder_from_vocab):
        assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (0, 49152, 49153)
        assert tok("def f(): pass")["input_ids"][0] != 0  # no BOS
        assert tok.encode("<fim_prefix>x<|endoftext|>[PAD]") == [1, 106, 0, 49152]
    assert wizardcoder.tokenizer_file.endswith("tokenizer.json")
    wizardcoder.add_eos_token = True
    try:
        assert wizardcoder("a")["input_ids"][-1] == 0
    finally:
        wizardcoder.add_eos_token = False
    assert wizardcoder("a")["input_ids"][-1] != 0


def test_wizardcoder_prefers_tokenizer_json_beside_vocab():
    src = tokenizer_path("wizardcoder")
    tok = WizardCoderTokenizer(vocab_file=os.path.join(src, "vocab.json"), merge_file=os.path.join(src, "merges.txt"))
    assert tok.tokenizer_file == os.path.join(src, "tokenizer.json")


def test_round_trip_on_python_source(deepseek_llm, deepseek_coder, wizardcoder, wizardcoder_from_vocab):
    path = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    for tok in (deepseek_llm, deepseek_coder, wizardcoder, wizardcoder_from_vocab):
        ids = tok.encode(source, add_special_tokens=False)
        assert len(ids) < len(source) / 2.5  # real BPE merges, not bytes
        assert tok.decode(ids) == source
    ids = deepseek_llm.encode(source)
    assert deepseek_llm.decode(ids, skip_special_tokens=True) == source


@pytest.mark.parametrize("kwargs", [dict(), dict(tokenizer_file="deepseek-coder"),
                                    dict(tokenizer_file="deepseek-coder", add_bos_token=False, add_eos_token=True,
                                         eos_token="<|EOT|>"), dict(eot_token=None)])
def test_deepseek_backend_is_the_classes_backend(kwargs):
    """``deepseek_backend`` (what the preprocess CLI uses, no MindFormers) builds the very backend of
    ``DeepSeekCoderTokenizer``: the same serialised state (vocabulary, added and special tokens with
    their flags, post-processor) and the same ids, special tokens in the text included."""
    import json

    from mindformers_ext.tokenizers.backend import deepseek_backend

    ours, theirs = deepseek_backend(**kwargs), DeepSeekCoderTokenizer(**kwargs)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in BACKEND_TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
    for token in ("<|EOT|>", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "no such token"):
        assert ours.convert_tokens_to_ids(token) == (theirs.convert_tokens_to_ids(token)
                                                     if token in theirs.get_vocab() else None)


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.json + merges.txt", "add_bos"])
def test_byte_level_backend_is_the_classes_backend(source, tmp_path):
    """``byte_level_backend`` (the WizardCoder preprocess CLI's) equals ``WizardCoderTokenizer``'s backend."""
    import json

    from mindformers_ext.tokenizers.backend import byte_level_backend

    kwargs = {"add_bos": dict(add_bos_token=True)}.get(source, {})
    if source == "vocab.json + merges.txt":
        for name in ("vocab.json", "merges.txt", "added_tokens.json"):
            shutil.copy(os.path.join(tokenizer_path("wizardcoder"), name), tmp_path / name)
        kwargs = dict(vocab_file=str(tmp_path / "vocab.json"))
    ours, theirs = byte_level_backend(**kwargs), WizardCoderTokenizer(**kwargs)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in BACKEND_TEXTS:
        assert ours.encode(text) == theirs.encode(text)


BACKEND_TEXTS = ["def fib(n):\n    return n if n < 2 else fib(n - 1)", "<|EOT|> a <｜begin▁of▁sentence｜>b",
                 "数字 123456 émoji 🙂\r\n\t", "<fim_prefix>a<fim_suffix>b<fim_middle>", "[PAD] <|endoftext|>x", ""]


def test_build_through_mindformers_registry():
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerConfig

    llm_file = os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json")
    # the YAML processor.tokenizer block, as upstream's scripts wrote it (strings 'None' included)
    tok = build_tokenizer(MindFormerConfig(**{
        "type": "DeepSeekCoderTokenizer", "vocab_file": None, "tokenizer_file": llm_file, "unk_token": "None",
        "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<|EOT|>", "pad_token": "<｜end▁of▁sentence｜>"}))
    assert isinstance(tok, DeepSeekCoderTokenizer)
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token) == (100015, 100001, None)
    # type alone: the shipped default (predict offline)
    tok = build_tokenizer({"type": "DeepSeekCoderTokenizer"})
    assert tok.bos_token_id == 100000
    src = tokenizer_path("wizardcoder")
    tok = build_tokenizer({"type": "WizardCoderTokenizer", "vocab_file": os.path.join(src, "vocab.json"),
                           "merge_file": os.path.join(src, "merges.txt")})
    assert isinstance(tok, WizardCoderTokenizer) and tok.pad_token_id == 49152
    tok = build_tokenizer({"type": "WizardCoderTokenizer"})
    assert tok.encode("x = 123") == [106, 280, 225, 35, 36, 37]  # digits one by one


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_file='/nonexistent/tok.json'"):
        DeepSeekCoderTokenizer(tokenizer_file="/nonexistent/tok.json")
    with pytest.raises(FileNotFoundError, match="is a directory without tokenizer.json"):
        DeepSeekCoderTokenizer(tokenizer_file=str(tmp_path))
    shutil.copy(os.path.join(tokenizer_path("wizardcoder"), "vocab.json"), tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="without merges_file"):
        WizardCoderTokenizer(vocab_file=str(tmp_path / "vocab.json"))


def test_save_and_reload(deepseek_llm, wizardcoder, tmp_path):
    for tok, cls in ((deepseek_llm, DeepSeekCoderTokenizer), (wizardcoder, WizardCoderTokenizer)):
        out = tmp_path / cls.__name__
        tok.save_pretrained(str(out), save_json=True)
        again = cls.from_pretrained(str(out))
        text = "for i in range(12):\n\tprint(i)<|EOT|>"
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_serving_text_decoder_equals_decode(deepseek_llm, deepseek_coder, wizardcoder, wizardcoder_from_vocab):
    """The serving engine decodes every new token of every request through ``_text_decoder``; it must
    give ``decode(ids, skip_special_tokens=True)`` exactly, special tokens and split characters included."""
    from mindformers_ext.serving.engine import _text_decoder

    rng = np.random.default_rng(0)
    for tok in (deepseek_llm, deepseek_coder, wizardcoder, wizardcoder_from_vocab):
        decoder = _text_decoder(tok)
        specials = [i for i in tok.all_special_ids if i is not None]
        text_ids = tok.encode("def f(x):\n    return 'é中' + x  # ünïcödé\n", add_special_tokens=False)
        for _ in range(20):
            ids = [int(i) for i in rng.integers(0, len(tok), size=int(rng.integers(1, 40)))]
            ids = ids + specials + text_ids[:int(rng.integers(0, len(text_ids)))]
            rng.shuffle(ids)
            assert decoder(ids) == tok.decode(ids, skip_special_tokens=True), type(tok).__name__
