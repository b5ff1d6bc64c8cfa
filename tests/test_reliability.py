"""Reliability under faults (issue 14): conversions never destroy data, batch predict keeps what it can,
preprocessing memory stays bounded. Every test uses temp paths only and runs in seconds."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from mindformers_ext.convert import ConversionError, convert
from mindformers_ext.convert.cli import main as convert_main
from mindformers_ext.convert.outputs import FileSink, stale_temps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ conversion
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from test_convert import _save_llama  # pylint: disable=import-outside-toplevel

    path = str(tmp_path_factory.mktemp("rel_llama") / "hf")
    _save_llama(path, 0)
    return path


class _Unhandled(Exception):
    pass


@pytest.fixture
def fallback_signals():
    """Signals the code under test fails to handle raise here instead of killing the test run."""
    def unhandled(signum, _frame):
        raise _Unhandled(f"signal {signum} reached the test's fallback handler")

    old = {s: signal.signal(s, unhandled) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def _temps(folder):
    return sorted(f for f in os.listdir(folder) if ".tmp-" in f)


def _convert(*argv):
    return convert_main(["--no_progress", *map(str, argv)])


def test_convert_refuses_output_equal_to_input(llama_dir, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(llama_dir, hf)
    before = {n: (hf / n).read_bytes() for n in os.listdir(hf)}
    # same directory, same file, a file that is one of the input's shards
    assert _convert("--model", "llama", "--input_path", hf, "--output_path", hf) == 1
    assert "the output path is the input path" in capsys.readouterr().err
    shard = hf / "model.safetensors"
    for out, overwrite in ((shard, []), (shard, ["--overwrite"])):
        assert _convert("--model", "llama", "--input_path", hf, "--output_path", out, *overwrite) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the output is the input" in err and str(shard) in err, err
    with pytest.raises(ConversionError, match="the output is the input"):
        convert(str(hf), str(shard), "llama", progress=False)  # the library refuses it too
    # reversed: an HF output directory that holds the input checkpoint
    ours = tmp_path / "ours"
    ours.mkdir()
    assert _convert("--model", "llama", "--input_path", hf, "--output_path", ours / "model.safetensors") == 0
    assert _convert("--model", "llama", "--reversed", "--input_path", ours / "model.safetensors",
                    "--output_path", ours, "--config", hf / "config.json", "--overwrite") == 1
    assert "holds the input" in capsys.readouterr().err
    assert {n: (hf / n).read_bytes() for n in os.listdir(hf)} == before
    assert os.listdir(ours) == ["model.safetensors"]


def test_convert_refuses_to_overwrite_without_flag(llama_dir, tmp_path, capsys):
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"precious")
    assert _convert("--model", "llama", "--input_path", llama_dir, "--output_path", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: exists; pass --overwrite" in err
    assert out.read_bytes() == b"precious"
    assert _convert("--model", "llama", "--input_path", llama_dir, "--output_path", out, "--overwrite") == 0
    assert out.stat().st_size > 1000
    # reversed into an HF directory that holds a checkpoint already
    back = tmp_path / "back"
    args = ["--model", "llama", "--reversed", "--input_path", out, "--output_path", back,
            "--config", os.path.join(llama_dir, "config.json")]
    assert _convert(*args) == 0
    assert _convert(*args) == 1
    assert "already holds config.json, model.safetensors; pass --overwrite" in capsys.readouterr().err
    assert _convert(*args, "--overwrite") == 0
    assert _temps(tmp_path) == []


# SIGINT last: were it unhandled, its KeyboardInterrupt would stop the pytest session
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_convert_signal_removes_temp_file(llama_dir, tmp_path, monkeypatch, capsys, sig, fallback_signals):
    out = tmp_path / "out.ckpt"
    out.write_bytes(b"old")
    seen = []
    real_write = FileSink.write

    def write_then_signal(self, info, array):
        real_write(self, info, array)
        seen.append(self.tmp)
        assert os.path.exists(self.tmp)
        os.kill(os.getpid(), sig)  # delivered right here, mid-conversion

    monkeypatch.setattr(FileSink, "write", write_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    rc = _convert("--model", "llama", "--input_path", llama_dir, "--output_path", out, "--overwrite")
    assert rc == 128 + sig
    assert f"interrupted by {sig.name}" in capsys.readouterr().err
    assert len(seen) == 1 and not os.path.exists(seen[0])
    assert _temps(tmp_path) == [] and out.read_bytes() == b"old"
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored


def test_convert_rerun_removes_stale_temps_of_its_output_only(llama_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out.ckpt"
        stale = [tmp_path / f"out.ckpt.tmp-{dead.pid}-0123abcd", tmp_path / "out.ckpt.tmp-89abcdef"]
        kept = [tmp_path / f"out.ckpt.tmp-{alive.pid}-0123abcd",  # a live conversion's temp
                tmp_path / f"other.ckpt.tmp-{dead.pid}-0123abcd",  # another output's
                tmp_path / "out.ckpt.tmp-notes.txt"]  # not a temp name
        for f in stale + kept:
            f.write_bytes(b"x" * 100)
        assert sorted(stale_temps(str(out))) == sorted(map(str, stale))
        assert _convert("--model", "llama", "--input_path", llama_dir, "--output_path", out) == 0
        assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
        # the HF-directory output (reversed) cleans its stale temp directories the same way
        back = tmp_path / "back"
        stale_dir = tmp_path / f"back.tmp-{dead.pid}-abc_1234"
        stale_dir.mkdir()
        (stale_dir / "model.safetensors").write_bytes(b"partial")
        assert _convert("--model", "llama", "--reversed", "--input_path", out, "--output_path", back,
                        "--config", os.path.join(llama_dir, "config.json")) == 0
        assert not stale_dir.exists() and sorted(os.listdir(back)) == ["config.json", "model.safetensors"]
    finally:
        alive.kill()
        alive.wait()


def test_convert_wrong_model_is_one_line_error(llama_dir, tmp_path, capsys):
    out = tmp_path / "out.ckpt"
    for model, expects in (("deepseek2", "'deepseek_v2'"), ("wizardcoder", "'gpt_bigcode'")):
        assert _convert("--model", model, "--input_path", llama_dir, "--output_path", out) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and os.path.join(llama_dir, "config.json") in err, err
        assert f"model_type 'llama' is not a {model} checkpoint" in err and expects in err
        assert "use --model llama" in err
    # a config without model_type: the map's missing key is named, with the file
    hf = tmp_path / "hf"
    shutil.copytree(llama_dir, hf)
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["model_type"]
    (hf / "config.json").write_text(json.dumps(cfg))
    assert _convert("--model", "deepseek2", "--input_path", hf, "--output_path", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(hf / "config.json") in err and "'qk_nope_head_dim'" in err, err
    assert "is --model deepseek2 the right model" in err
    assert not out.exists() and _temps(tmp_path) == []


# --------------------------------------------------------------------------------------- predict
PREDICT_TINY = os.path.join(REPO, "configs", "deepseek1_5", "predict_tiny.yaml")


def test_predict_prompts_keep_bad_lines_and_results_are_atomic(tmp_path):
    from mindformers_ext.runner.predict import Completion, read_prompts, utf8_error, write_jsonl

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"good one\n\xff\xfebad line\n\nlast\\nline\n")
    got = read_prompts(str(prompts))
    assert len(got) == 3 and got[0] == "good one" and got[2] == "last\nline"
    assert utf8_error(got[0]) is None and utf8_error(got[1]) == "not valid UTF-8: byte 0xff at line 1, column 1"
    assert Completion(got[1], "", [], error="x").as_json()["prompt"] == "\\xff\\xfebad line"
    out = tmp_path / "res" / "predict_results.jsonl"

    def rows(n, fail=False):
        for i in range(n):
            yield Completion(f"p{i}", "t", [1])
        if fail:
            raise RuntimeError("killed midway")

    write_jsonl(rows(3), str(out))
    assert len(out.read_text().splitlines()) == 3
    with pytest.raises(RuntimeError):
        write_jsonl(rows(2, fail=True), str(out))
    assert [json.loads(r)["prompt"] for r in out.read_text().splitlines()] == ["p0", "p1"]  # kept, not stale
    write_jsonl(rows(0), str(out))
    assert not out.exists()  # nothing produced: no older results left behind
    assert os.listdir(out.parent) == []


def _main_error(capsys, *argv):
    from mindformers_ext.runner.main import main

    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_predict_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_mode: predict\nmodel:\n  arch: {type: Foo\n  x: 1\n")
    rc, err = _main_error(capsys, "--config", str(bad))
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert f"{bad}:4:4: invalid YAML: while parsing a flow mapping" in err, err
    bad.write_bytes(b"run_mode: predict\nmodel: \xff\n")
    rc, err = _main_error(capsys, "--config", str(bad))
    assert rc == 2 and "\n" not in err and f"{bad}: not valid UTF-8: byte 0xff at byte offset 25" in err, err
    unknown = tmp_path / "unknown.yaml"
    text = open(PREDICT_TINY, encoding="utf-8").read()
    assert "type: DeepSeekCoderForCausalLM" in text
    unknown.write_text(text.replace("type: DeepSeekCoderForCausalLM", "type: DeepSeekCoderForCausalLm"))
    rc, err = _main_error(capsys, "--config", str(unknown), "--random_weights", "--predict_data", "x")
    assert rc == 2 and "\n" not in err, err
    assert f"{unknown}: model.arch.type: unknown model type 'DeepSeekCoderForCausalLm'" in err
    assert "did you mean DeepSeekCoderForCausalLM" in err


def test_predict_batch_bad_prompts_fail_alone(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    results = out_dir / "predict_results.jsonl"
    results.write_text('{"prompt": "stale from an older run"}\n')
    env = dict(os.environ, PYTHONPATH=REPO, GLOG_v="3")
    env.pop("LOG_MF_PATH", None)
    argv = [sys.executable, os.path.join(REPO, "tools", "run_mindformer.py"), "--config", PREDICT_TINY,
            "--random_weights", "--predict_length", "3", "--predict_batch_size", "2", "--output_dir", str(out_dir),
            "--predict_data", "def f():", b"bad \xff\xfe prompt", "x " * 400, "print(1)"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=400, check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert "error: prompt 2: not valid UTF-8: byte 0xff at line 1, column 5" in err
    assert "2 of 4 prompts failed" in err
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"][:8] for r in rows] == ["def f():", "bad \\xff", "x x x x ", "print(1)"]
    assert [bool(r.get("error")) for r in rows] == [False, True, True, False]
    assert "exceeds the model's context" in rows[2]["error"] and rows[2]["error"].startswith("prompt 3:")
    assert len(rows[0]["ids"]) == 3 and len(rows[3]["ids"]) == 3
    assert sorted(os.listdir(out_dir)) == ["predict_results.jsonl"] or not any(".tmp-" in f for f in
                                                                            os.listdir(out_dir))


# ---------------------------------------------------------------------------------- preprocessing
@pytest.fixture(scope="module")
def ds_tokenizer():
    from mindformers_ext.tokenizers.deepseek import DeepSeekCoderTokenizer  # pylint: disable=C0415

    return DeepSeekCoderTokenizer()


def _code_text(chars, seed=0):
    import random  # pylint: disable=import-outside-toplevel

    rng = random.Random(seed)
    words = ["def", "foo(x):", "return", "x", "+", "1", "\n", "    ", "for", "i", "in", "range(10):", "print(i)",
             "# 注释", "数据", "😀", "class", "Bar:", "self.value", "=", "None", " " * 40, "0123456789"]
    out, n = [], 0
    while n < chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def test_encode_prefix_matches_full_encoding(ds_tokenizer):
    from mindformers_ext.data.sft import encode_prefix

    for seed, size in ((0, 300), (1, 20000), (2, 200000)):
        text = _code_text(size, seed)
        full = ds_tokenizer.encode(text, add_special_tokens=True)
        for need in (1, 17, 513, 4097):
            ids, complete = encode_prefix(ds_tokenizer, text, need, True)
            assert ids == full[:len(ids)], (seed, need)
            assert complete == (len(ids) == len(full)) and (complete or len(ids) >= need)


def test_bounded_samples_equal_full_tokenisation(ds_tokenizer):
    from mindformers_ext.data import get_template
    from mindformers_ext.data.records import InstructionRecord
    from mindformers_ext.data.sft import SFTEncoder, build_sample

    big, small = _code_text(100000, 3), "sort a list"
    records = [InstructionRecord(small, "", big, "t", "1"), InstructionRecord(big, "", small, "t", "2"),
               InstructionRecord(small, big, small, "t", "3"), InstructionRecord(small, "", small, "t", "4")]
    template = get_template("deepseek-instruct")
    full = [SFTEncoder(ds_tokenizer, template, 8, 100015).tokenize(r) for r in records]  # whole texts, once
    for seq_length in (256, 2048):
        for drop_long in (False, True):
            enc = SFTEncoder(ds_tokenizer, template, seq_length, 100015, drop_long)
            for record, tokens in zip(records, full):
                got, status = enc.encode(record)
                want, want_status = build_sample(*tokens, seq_length, 100015, drop_long)
                assert status == want_status
                assert (got is None) == (want is None)
                if got is not None:
                    assert (got.input_ids == want.input_ids).all() and (got.labels == want.labels).all()


def test_preprocess_48mb_record_memory_bounded(tmp_path):
    data = tmp_path / "big.jsonl"
    text = _code_text(48 * 2**20, 4)
    with open(data, "w", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "small", "input": "", "output": "ok"}) + "\n")
        f.write(json.dumps({"instruction": "Explain this code.", "input": "", "output": text}) + "\n")
    del text
    code = (
        "import json, resource, sys, time\n"
        "from research.deepseek1_5 import deepseek_preprocess_1_5 as pre\n"
        "def run(src, out):\n"
        "    t = time.time(); pre.main(['--input_glob', src, '--seq_length', '4096', '--output_file', out,\n"
        "                               '--no_progress']); return time.time() - t\n"
        "small = sys.argv[1] + '.small'\n"
        "open(small, 'w').write(open(sys.argv[1]).readline())\n"
        "run(small, sys.argv[2] + '.warm')\n"  # imports, tokenizer, MindRecord writer: the baseline
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "seconds = run(sys.argv[1], sys.argv[2])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'base_kib': base, 'peak_kib': peak, 'seconds': seconds}))\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "out.mindrecord")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "records 2: written 2 (truncated 1)" in proc.stdout
    grown = (report["peak_kib"] - report["base_kib"]) / 2**20
    print("48 MB record:", report)
    assert grown < 1.0, report  # GiB over the baseline, for a 48 MB text (was ~9.7 GB)
    assert report["seconds"] < 60, report


def test_preprocess_says_why_nothing_was_written(tmp_path, capsys):
    from mindformers_ext.data import cli_exit
    from research.deepseek1_5 import deepseek_preprocess_1_5 as pre

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "word " * 300, "output": "ok"}) + "\n")
    out = tmp_path / "out.mindrecord"
    base = ["--input_glob", str(data), "--output_file", str(out), "--no_progress"]
    assert cli_exit(lambda: pre.main(base + ["--seq_length", "16"])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq_length 16 is too small for template 'deepseek-instruct'" in err, err
    assert "nothing would be written" in err
    assert cli_exit(lambda: pre.main(base + ["--seq_length", "128"])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no samples to write to {out}: all 1 records were dropped" in err, err
    assert "fills seq_length + 1 = 129 tokens" in err and "raise --seq_length" in err
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_preprocess_temp_dir_removed_on_signal_and_when_stale(tmp_path, monkeypatch, capsys, fallback_signals):
    from mindformers_ext.data import cli_exit
    from mindformers_ext.data.mindrecord_io import AtomicMindRecordWriter
    from research.deepseek1_5 import deepseek_preprocess_1_5 as pre

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "sort", "output": "sorted(x)"}) + "\n")
    out = tmp_path / "out.mindrecord"
    args = ["--input_glob", str(data), "--output_file", str(out), "--no_progress", "--seq_length", "512"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".out.mindrecord.{dead.pid}-abcd1234.tmp", tmp_path / ".out.mindrecord.abcd_234.tmp"]
    live = tmp_path / f".out.mindrecord.{os.getppid()}-abcd1234.tmp"
    for d in stale + [live]:
        d.mkdir()
        (d / "out.mindrecord").write_bytes(b"partial")
    real_write = AtomicMindRecordWriter.write

    def write_then_signal(self, rows):
        real_write(self, rows)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(AtomicMindRecordWriter, "write", write_then_signal)
    assert cli_exit(lambda: pre.main(args)) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM; nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(["d.jsonl", live.name])  # stale ones gone, no new temp
    monkeypatch.setattr(AtomicMindRecordWriter, "write", real_write)
    assert cli_exit(lambda: pre.main(args)) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["d.jsonl", live.name, "out.mindrecord", "out.mindrecord.db"])
