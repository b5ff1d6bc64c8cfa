"""Instruction data -> MindRecord: prompts, masks, padding, counts, input detection, failure modes.

Expected ids are computed independently with Hugging Face's PreTrainedTokenizerFast on the shipped
tokenizer files and on prompt strings written out here in full.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_test_logs"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mindspore.mindrecord import FileReader  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from mindformers_ext.data import (IGNORE_INDEX, DataFormatError, build_sample, cli_exit,  # noqa: E402
                                  detect_format, read_records)
from mindformers_ext.tokenizers import tokenizer_path  # noqa: E402
from research.deepseek1_5 import deepseek_preprocess_1_5 as ds_pre  # noqa: E402
from research.wizardcoder import wizardcoder_preprocess as wc_pre  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEEPSEEK_PROMPT = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeek Company, "
    "and you only answer questions related to computer science. For politically sensitive questions, security "
    "and privacy issues, and other non-computer science questions, you will refuse to answer.\n"
    "### Instruction:\n{}\n### Response:\n")
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response:")

RECORDS = [
    {"instruction": "Write hello world in Python.", "input": "", "output": "print('hello world')"},
    {"instruction": "Add two numbers. ", "input": "a = 1, b = 22",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Sort a list", "output": "sorted(xs)  # 3 items"},  # no input key at all
]


@pytest.fixture(scope="module")
def hf_deepseek():
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": ["<|EOT|>"]})
    assert tok.convert_tokens_to_ids("<|EOT|>") == 100015
    return tok


@pytest.fixture(scope="module")
def hf_wizard():
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_path("wizardcoder"), "tokenizer.json"))


def write_json(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=2)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)


def read_mindrecord(path):
    reader = FileReader(str(path))
    try:
        rows = list(reader.get_next())
    finally:
        reader.close()
    return [(row["input_ids"], row["labels"]) for row in rows]


def expected_row(prompt_ids, target_ids, seq_length, pad):
    ids = prompt_ids + target_ids
    pad_n = seq_length + 1 - len(ids)
    assert pad_n >= 0
    return (np.array(ids + [pad] * pad_n, np.int32),
            np.array([IGNORE_INDEX] * len(prompt_ids) + target_ids + [IGNORE_INDEX] * pad_n, np.int32))


def assert_rows(rows, expected):
    assert len(rows) == len(expected)
    for (ids, labels), (want_ids, want_labels) in zip(rows, expected):
        assert ids.dtype == np.int32 and labels.dtype == np.int32
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels, want_labels)


def test_deepseek_instruct_masks(tmp_path, hf_deepseek):
    src = write_json(tmp_path / "code_alpaca.json", RECORDS)
    out = tmp_path / "out" / "ds.mindrecord"
    stats = ds_pre.main(["--dataset_type", "qa", "--input_glob", src, "--seq_length", "128",
                         "--output_file", str(out), "--no_progress"])
    assert (stats.written, stats.truncated, stats.dropped) == (3, 0, 0)
    instructions = ["Write hello world in Python.", "Add two numbers.\n\na = 1, b = 22", "Sort a list"]
    expected = []
    for record, instruction in zip(RECORDS, instructions):
        prompt = hf_deepseek(DEEPSEEK_PROMPT.format(instruction))["input_ids"]
        assert prompt[0] == 100000  # BOS
        target = hf_deepseek(record["output"] + "\n<|EOT|>", add_special_tokens=False)["input_ids"]
        assert target[-1] == 100015
        expected.append(expected_row(prompt, target, 128, pad=100015))  # pad defaults to <|EOT|>
    rows = read_mindrecord(out)
    assert_rows(rows, expected)
    # The end token is learnable although it equals the pad id: after MindFormers' shift
    # (inputs ids[:-1], targets labels[1:]) exactly one scored target is <|EOT|>.
    ids, labels = rows[0]
    scored = labels[1:][labels[1:] != IGNORE_INDEX]
    assert scored[-1] == 100015 and list(scored).count(100015) == 1
    assert os.path.isfile(str(out) + ".db")
    assert sorted(os.listdir(out.parent)) == ["ds.mindrecord", "ds.mindrecord.db"]  # no temp leftovers


def test_deepseek_base_template_and_v1_tokenizer(tmp_path, hf_deepseek):
    src = write_jsonl(tmp_path / "data.jsonl", RECORDS[:1])
    out = tmp_path / "base.mindrecord"
    ds_pre.main(["--input_glob", src, "--seq_length", "100", "--output_file", str(out), "--template", "base",
                 "--no_progress"])
    prompt = hf_deepseek(DEEPSEEK_PROMPT.format(RECORDS[0]["instruction"]))["input_ids"]
    target = hf_deepseek(RECORDS[0]["output"] + "\n", add_special_tokens=False)["input_ids"] + [100001]
    assert_rows(read_mindrecord(out), [expected_row(prompt, target, 100, pad=100001)])

    out_v1 = tmp_path / "v1.mindrecord"
    ds_pre.main(["--input_glob", src, "--seq_length", "100", "--output_file", str(out_v1),
                 "--model_file", "deepseek-coder", "--pad_token_id", "32014", "--no_progress"])
    hf_v1 = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_path("deepseek-coder"), "tokenizer.json"))
    prompt = hf_v1(DEEPSEEK_PROMPT.format(RECORDS[0]["instruction"]))["input_ids"]
    target = hf_v1(RECORDS[0]["output"] + "\n<|EOT|>", add_special_tokens=False)["input_ids"]
    assert prompt[0] == 32013 and target[-1] == 32021
    assert_rows(read_mindrecord(out_v1), [expected_row(prompt, target, 100, pad=32014)])


def test_wizardcoder_alpaca_masks_json_and_jsonl(tmp_path, hf_wizard):
    # content decides the format, not the extension
    as_jsonl = write_jsonl(tmp_path / "evol.json", RECORDS)
    as_json = write_json(tmp_path / "evol.jsonl", RECORDS)
    assert (detect_format(as_jsonl), detect_format(as_json)) == ("jsonl", "json")
    expected = []
    for record in RECORDS:
        if record.get("input"):
            prompt_text = ALPACA_INPUT.format(record["instruction"], record["input"])
        else:
            prompt_text = ALPACA_NO_INPUT.format(record["instruction"])
        prompt = hf_wizard(prompt_text)["input_ids"]
        target = hf_wizard(record["output"] + "<|endoftext|>")["input_ids"]
        assert prompt[0] != 0 and target[-1] == 0
        expected.append(expected_row(prompt, target, 96, pad=49152))
    assert "a = 1, b = 22" in hf_wizard.decode(expected[1][0])  # the input field is in the prompt
    for i, src in enumerate((as_jsonl, as_json)):
        out = tmp_path / f"wc{i}.mindrecord"
        stats = wc_pre.main(["--input_glob", src, "--output_file", str(out), "--seq_length", "96", "--no_progress"])
        assert stats.written == 3
        assert_rows(read_mindrecord(out), expected)
    # the seed CLI: vocab.json + merges.txt
    src_dir = tokenizer_path("wizardcoder")
    out = tmp_path / "wc_vocab.mindrecord"
    wc_pre.main(["--input_glob", as_json, "--vocab_file", os.path.join(src_dir, "vocab.json"),
                 "--merge_file", os.path.join(src_dir, "merges.txt"), "--output_file", str(out),
                 "--seq_length", "96", "--no_progress"])
    assert_rows(read_mindrecord(out), expected)


def test_truncate_and_drop_counts(tmp_path, hf_wizard):
    long_output = "\n".join(f"print({i})" for i in range(60))
    records = RECORDS[:1] + [{"instruction": "Print numbers.", "output": long_output},
                             {"instruction": "word " * 200, "output": "x"}]
    src = write_json(tmp_path / "mixed.json", records)
    seq = 64
    out = tmp_path / "trunc.mindrecord"
    stats = wc_pre.main(["--input_glob", src, "--output_file", str(out), "--seq_length", str(seq), "--no_progress"])
    assert (stats.records, stats.written, stats.truncated, stats.dropped_long, stats.dropped_no_target) == \
        (3, 2, 1, 0, 1)
    rows = read_mindrecord(out)
    ids, labels = rows[1]
    prompt = hf_wizard(ALPACA_NO_INPUT.format("Print numbers."))["input_ids"]
    full = prompt + hf_wizard(long_output + "<|endoftext|>")["input_ids"]
    assert len(ids) == len(labels) == seq + 1
    np.testing.assert_array_equal(ids, full[:seq + 1])  # cut on the right, no padding
    np.testing.assert_array_equal(labels[len(prompt):], full[len(prompt):seq + 1])
    assert (labels[:len(prompt)] == IGNORE_INDEX).all() and 0 not in labels  # end token cut off

    out = tmp_path / "drop.mindrecord"
    stats = wc_pre.main(["--input_glob", src, "--output_file", str(out), "--seq_length", str(seq), "--drop_long",
                         "--no_progress"])
    assert (stats.written, stats.truncated, stats.dropped_long, stats.dropped_no_target) == (1, 0, 2, 0)
    assert len(read_mindrecord(out)) == 1


def test_build_sample_masks_by_position():
    # pad id == end id: padding is ignored, the real end token is not
    sample, status = build_sample([1, 2, 3], [7, 9], seq_length=7, pad_token_id=9)
    assert status == "ok"
    assert sample.input_ids.tolist() == [1, 2, 3, 7, 9, 9, 9, 9]
    assert sample.labels.tolist() == [-100, -100, -100, 7, 9, -100, -100, -100]
    assert build_sample([1, 2, 3], [7, 9], seq_length=2, pad_token_id=0) == (None, "dropped_no_target")
    sample, status = build_sample([1, 2, 3], [7, 9], seq_length=3, pad_token_id=0)
    assert status == "truncated" and sample.labels.tolist() == [-100, -100, -100, 7]
    assert build_sample([1, 2, 3], [7, 9], seq_length=3, pad_token_id=0, drop_long=True) == (None, "dropped_long")


def test_malformed_inputs_name_file_and_line(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"instruction": "x", "output": }\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON line"):
        list(read_records(str(bad_jsonl)))
    missing = tmp_path / "missing.json"
    missing.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"missing\.json: record 1 \(line 3\): missing key 'output'"):
        list(read_records(str(missing)))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d",}\n]',
                      encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json:3: record 1 \(line 3\): invalid JSON"):
        list(read_records(str(broken)))
    wrong_type = tmp_path / "wrong.jsonl"
    wrong_type.write_text('{"instruction": "a", "input": 5, "output": "b"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"wrong\.jsonl: line 1: key 'input' must be a string or null"):
        list(read_records(str(wrong_type)))
    single = tmp_path / "single.json"
    single.write_text('{\n  "instruction": "a",\n  "output": "b"\n}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"single\.json:1: .*pretty-printed JSON object"):
        list(read_records(str(single)))
    for name, text in (("empty.json", "  \n"), ("csv.json", "a,b\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(DataFormatError, match=name.replace(".", r"\.")):
            detect_format(str(tmp_path / name))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\r\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataFormatError, match=r"latin\.jsonl:2: not UTF-8"):
        list(read_records(str(latin)))
    latin_list = tmp_path / "latin_list.json"
    latin_list.write_bytes(b'[\n{"instruction": "a",\n "output": "caf\xe9"}]')
    with pytest.raises(DataFormatError, match=r"latin_list\.json:3: not UTF-8"):
        list(read_records(str(latin_list)))
    bom = tmp_path / "bom.json"
    bom.write_text("\ufeff \n" + json.dumps(RECORDS), encoding="utf-8")
    assert [r.instruction for r in read_records(str(bom))] == [r["instruction"] for r in RECORDS]
    assert [r.where for r in read_records(write_jsonl(tmp_path / "w.jsonl", RECORDS))] == \
        ["line 1", "line 2", "line 3"]


def test_failure_leaves_no_output(tmp_path):
    good = write_json(tmp_path / "a_good.json", RECORDS)
    bad = tmp_path / "b_bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "no output"}) + "\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    out = out_dir / "x.mindrecord"
    with pytest.raises(DataFormatError, match=r"b_bad\.jsonl: line 2: missing key 'output'"):
        wc_pre.main(["--input_glob", str(tmp_path / "*_*.json*"), "--output_file", str(out), "--seq_length", "96",
                     "--no_progress"])
    # the good file came first: its samples went to the temporary directory only
    assert not out_dir.exists()  # not even the directory it created
    with pytest.raises(ValueError, match="too small for template 'alpaca'"):  # nothing could fit: said up front
        wc_pre.main(["--input_glob", good, "--output_file", str(out), "--seq_length", "8", "--no_progress"])
    assert not out_dir.exists()
    with pytest.raises(ValueError, match="no samples to write .*: all 3 records were dropped"):  # everything dropped
        wc_pre.main(["--input_glob", good, "--output_file", str(out), "--seq_length", "30", "--no_progress"])
    assert not out_dir.exists()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        wc_pre.main(["--input_glob", str(tmp_path / "nothing*.json"), "--output_file", str(out),
                     "--seq_length", "96"])


def test_refuses_overwrite(tmp_path, capsys):
    src = write_json(tmp_path / "a.json", RECORDS)
    out = tmp_path / "o.mindrecord"
    args = ["--input_glob", src, "--output_file", str(out), "--seq_length", "96", "--no_progress"]
    wc_pre.main(args)
    before = read_mindrecord(out)
    src2 = write_json(tmp_path / "b.json", RECORDS[:1])
    args2 = ["--input_glob", src2, "--output_file", str(out), "--seq_length", "96", "--no_progress"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        wc_pre.main(args2)
    assert cli_exit(lambda: wc_pre.main(args2)) == 1  # what the scripts' __main__ does: one line, no traceback
    assert "error: output" in capsys.readouterr().err
    assert len(read_mindrecord(out)) == len(before) == 3
    (tmp_path / "lonely.mindrecord.db").write_text("")  # a stray index counts as output too
    with pytest.raises(FileExistsError):
        wc_pre.main(["--input_glob", src2, "--output_file", str(tmp_path / "lonely.mindrecord"),
                     "--seq_length", "96"])
    wc_pre.main(args2 + ["--overwrite"])
    assert len(read_mindrecord(out)) == 1
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json", "lonely.mindrecord.db", "o.mindrecord",
                                            "o.mindrecord.db"]


def test_cli_scripts_run_without_mindformers(tmp_path):
    """Both preprocess CLIs import no MindFormers (about 4 s of start-up; their tokenizer backends are
    the classes' own, see test_tokenizers.py): they work with ``import mindformers`` made to fail."""
    blocker = tmp_path / "blocker" / "mindformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('preprocessing imported mindformers')\n")
    src = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    env = dict(os.environ, LOG_MF_PATH=str(tmp_path / "log"), PYTHONPATH=str(tmp_path / "blocker"))
    for script, out in (("research/deepseek1_5/deepseek_preprocess_1_5.py", "ds.mindrecord"),
                        ("research/wizardcoder/wizardcoder_preprocess.py", "wc.mindrecord")):
        cmd = [sys.executable, os.path.join(REPO, script), "--input_glob", src, "--seq_length", "128",
               "--output_file", str(tmp_path / out)]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (script, done.stderr[-2000:])
        assert "written 3 (truncated 0), dropped 0" in done.stdout, done.stdout
        assert len(read_mindrecord(str(tmp_path / out))) == 3


def test_cli_script_runs(tmp_path):
    """The script runs as the seeds' READMEs call it (by path, repository root not installed)."""
    src = write_jsonl(tmp_path / "data.txt", RECORDS)
    env = dict(os.environ, LOG_MF_PATH=str(tmp_path / "log"), PYTHONPATH="")
    script = os.path.join(REPO, "research", "deepseek1_5", "deepseek_preprocess_1_5.py")
    cmd = [sys.executable, script, "--dataset_type", "qa", "--input_glob", src, "--seq_length", "128",
           "--pad_token_id", "100015", "--output_file", str(tmp_path / "o.mindrecord")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "written 3 (truncated 0), dropped 0" in done.stdout
