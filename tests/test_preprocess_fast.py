"""The batched preprocessing path (encode_batch, numpy packing, chunked MindRecord writes) against a
straightforward reference written out here: Hugging Face's PreTrainedTokenizerFast on the shipped
tokenizer files, the templates' prompt strings in full, and the documented masking rules
(``mindformers_ext/data/sft.py``), one record at a time in plain Python.
"""
import importlib.util
import json
import os
import stat
import tempfile

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_test_logs"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mindspore.mindrecord import FileReader  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from mindformers_ext.data import PromptTemplate, SFTEncoder, get_template, pipeline, read_records  # noqa: E402
from mindformers_ext.tokenizers import tokenizer_path  # noqa: E402
from research.deepseek1_5 import deepseek_preprocess_1_5 as ds_pre  # noqa: E402
from research.wizardcoder import wizardcoder_preprocess as wc_pre  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100

# the prompt templates written out independently of the code under test (shared with test_preprocess)
from test_preprocess import ALPACA_INPUT, ALPACA_NO_INPUT, DEEPSEEK_PROMPT  # noqa: E402


def _bench_records(samples):
    spec = importlib.util.spec_from_file_location("bench_preprocess", os.path.join(REPO, "bench", "preprocess.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_records(samples, seed=1)


def awkward_records():
    """Edge cases for the batch path: boundaries, whitespace, special-token text, huge texts."""
    code = "\n".join(f"    x{i} = {i} * 2  # 注释 😀" for i in range(900))  # ~30K characters: over the batch bound
    return [
        {"instruction": "\n\n  leading newlines and spaces", "input": "\n  indented input\n", "output": "\n\nok"},
        {"instruction": "empty output", "output": ""},
        {"instruction": "whitespace input", "input": "  \n\t", "output": "x"},
        {"instruction": "crlf\r\nlines", "input": "a\r\nb", "output": "line1\r\nline2\r\n"},
        {"instruction": "special text", "output": "ends with <|EOT|> and <|endoftext|> in the text"},
        {"instruction": "huge answer", "output": code},
        {"instruction": code, "output": "huge prompt"},
        {"instruction": "huge input", "input": code, "output": "short"},
        {"instruction": "digits 1234567890 and unicode ü ß 数据", "input": None, "output": "print(3.14159)"},
        {"instruction": "trailing spaces   ", "output": "trailing spaces and newline   \n"},
    ]


@pytest.fixture(scope="module")
def records():
    return _bench_records(300) + awkward_records()


@pytest.fixture(scope="module")
def hf_deepseek():
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": ["<|EOT|>"]})
    return tok


@pytest.fixture(scope="module")
def hf_wizard():
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_path("wizardcoder"), "tokenizer.json"))


def deepseek_texts(record):
    instruction = record["instruction"].strip()
    given = record.get("input")
    if given and given.strip():
        instruction = f"{instruction}\n\n{given.strip()}"
    return DEEPSEEK_PROMPT.format(instruction), record["output"] + "\n"


def alpaca_texts(record):
    given = record.get("input")
    if given and given.strip():
        return ALPACA_INPUT.format(record["instruction"], given), record["output"]
    return ALPACA_NO_INPUT.format(record["instruction"]), record["output"]


def reference(hf, texts, records, end_id, seq_length, pad, drop_long):
    """Written rows and status counts, one record at a time, straight from the documented rules."""
    length = seq_length + 1
    rows, counts = [], {"ok": 0, "truncated": 0, "dropped_long": 0, "dropped_no_target": 0}
    for record in records:
        prompt_text, target_text = texts(record)
        prompt = hf(prompt_text)["input_ids"]
        target = (hf(target_text, add_special_tokens=False)["input_ids"] if target_text else []) + [end_id]
        ids, labels = prompt + target, [IGNORE] * len(prompt) + target
        status = "ok"
        if len(ids) > length:
            if drop_long:
                counts["dropped_long"] += 1
                continue
            ids, labels, status = ids[:length], labels[:length], "truncated"
        if all(label == IGNORE for label in labels[1:]):
            counts["dropped_no_target"] += 1
            continue
        counts[status] += 1
        rows.append((ids + [pad] * (length - len(ids)), labels + [IGNORE] * (length - len(labels))))
    return rows, counts


def read_rows(path):
    reader = FileReader(str(path))
    try:
        return [(row["input_ids"], row["labels"]) for row in reader.get_next()]
    finally:
        reader.close()


@pytest.mark.parametrize("drop_long", [False, True])
@pytest.mark.parametrize("family", ["deepseek", "wizardcoder"])
def test_batched_records_equal_reference(tmp_path, monkeypatch, records, hf_deepseek, hf_wizard, family, drop_long):
    monkeypatch.setattr(pipeline, "_BATCH", 64)  # several chunks: their order and the worker thread count
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out.mindrecord"
    seq_length = 256  # prompts and answers of the generated set cross it; the huge records go the bounded way
    args = ["--input_glob", str(src), "--output_file", str(out), "--seq_length", str(seq_length), "--no_progress"]
    args += ["--drop_long"] if drop_long else []
    if family == "deepseek":
        stats = ds_pre.main(args)
        want, counts = reference(hf_deepseek, deepseek_texts, records, 100015, seq_length, 100015, drop_long)
    else:
        stats = wc_pre.main(args)
        want, counts = reference(hf_wizard, alpaca_texts, records, 0, seq_length, 49152, drop_long)
    got = read_rows(out)
    assert (stats.records, stats.written, stats.truncated, stats.dropped_long, stats.dropped_no_target) == \
        (len(records), len(want), counts["truncated"], counts["dropped_long"], counts["dropped_no_target"])
    # the set exercises every rule (with --drop_long, the prompts that fill the window are too long first)
    assert counts["ok"] > 200 and counts["dropped_no_target"] >= (0 if drop_long else 2)
    assert counts["dropped_long" if drop_long else "truncated"] >= 10
    assert len(got) == len(want)
    for index, ((ids, labels), (want_ids, want_labels)) in enumerate(zip(got, want)):
        assert ids.dtype == labels.dtype == np.int32
        assert ids.tolist() == want_ids, f"row {index}: input_ids"
        assert labels.tolist() == want_labels, f"row {index}: labels"


def test_newline_split_only_where_exact():
    """The DeepSeek prompt's constant head is encoded once; not WizardCoder's (its pre-tokenizer joins a
    newline to the whitespace after it), nor without a backend tokenizer."""
    from mindformers_ext.tokenizers.deepseek import DeepSeekCoderTokenizer
    from research.wizardcoder.wizardcoder_tokenizer import WizardCoderTokenizer

    deepseek = SFTEncoder(DeepSeekCoderTokenizer(), get_template("deepseek-instruct"), 64, 100015)
    assert deepseek._head.endswith("### Instruction:\n") and deepseek._head_ids[0] == 100000  # BOS kept
    wizard = WizardCoderTokenizer()
    assert SFTEncoder(wizard, get_template("alpaca"), 64, 49152)._head == ""
    headed = PromptTemplate(name="headed", prompt_no_input="### Instruction:\n{instruction}", prompt_input=None,
                            target="{output}", end_token="<|endoftext|>")
    assert SFTEncoder(wizard, headed, 64, 49152)._head == ""
    # where the split would be wrong for WizardCoder: a newline followed by whitespace
    backend = wizard.backend_tokenizer
    text = "### Instruction:\n  indented"
    cut = text.index("\n") + 1
    assert backend.encode(text).ids != backend.encode(text[:cut]).ids + backend.encode(text[cut:]).ids


class _SlowOnly:
    """A tokenizer without a Rust backend (only encode and the token lookups)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def encode(self, text, add_special_tokens=True):
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def convert_tokens_to_ids(self, token):
        return self._tokenizer.convert_tokens_to_ids(token)

    def convert_ids_to_tokens(self, index):
        return self._tokenizer.convert_ids_to_tokens(index)


@pytest.mark.parametrize("line_cache_chars", [2**24, 3000])  # 3000: trimmed on almost every batch
def test_encode_many_equals_encode(tmp_path, monkeypatch, records, line_cache_chars):
    from mindformers_ext.data import sft
    from mindformers_ext.tokenizers.deepseek import DeepSeekCoderTokenizer

    monkeypatch.setattr(sft, "_LINE_CACHE_CHARS", line_cache_chars)
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    parsed = list(read_records(str(src)))
    tokenizer = DeepSeekCoderTokenizer()
    for tok in (tokenizer, _SlowOnly(tokenizer)):
        encoder = SFTEncoder(tok, get_template("deepseek-instruct"), 128, 100015)
        parts = [encoder.encode_many(parsed[i:i + 40]) for i in range(0, len(parsed), 40)]  # the line cache reused
        input_ids, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        statuses = [status for part in parts for status in part[2]]
        one_by_one = [encoder.encode(record) for record in parsed]
        assert statuses == [status for _, status in one_by_one]
        samples = [sample for sample, _ in one_by_one if sample is not None]
        assert len(samples) == len(input_ids)
        for sample, ids, lab in zip(samples, input_ids, labels):
            assert (sample.input_ids == ids).all() and (sample.labels == lab).all()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_honour_umask(tmp_path, umask):
    src = tmp_path / "data.json"
    src.write_text(json.dumps(awkward_records()[:3]), encoding="utf-8")
    out = tmp_path / "o.mindrecord"
    old = os.umask(umask)
    try:
        wc_pre.main(["--input_glob", str(src), "--output_file", str(out), "--seq_length", "128", "--no_progress"])
    finally:
        os.umask(old)
    for path in (out, tmp_path / "o.mindrecord.db"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


def test_pack_samples_rules_and_order():
    from mindformers_ext.data.sft import pack_samples

    prompts = [[1, 2], [], [], [1, 2, 3, 4], [5]]
    targets = [[7, 9], [7], [7, 8], [7], [6, 6, 6, 6]]
    ids, labels, statuses = pack_samples(prompts, targets, seq_length=3, pad_token_id=9)
    # an empty prompt's first target token sits at labels[0], which is never scored
    assert statuses == ["ok", "dropped_no_target", "ok", "dropped_no_target", "truncated"]
    assert ids.tolist() == [[1, 2, 7, 9], [7, 8, 9, 9], [5, 6, 6, 6]]
    assert labels.tolist() == [[-100, -100, 7, 9], [7, 8, -100, -100], [-100, 6, 6, 6]]
    ids, labels, statuses = pack_samples(prompts, targets, seq_length=3, pad_token_id=9, drop_long=True)
    assert statuses == ["ok", "dropped_no_target", "ok", "dropped_long", "dropped_long"] and len(ids) == 2
