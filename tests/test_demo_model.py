"""The embedded demo checkpoint (mindformers_ext/assets/demo): the README's main job completes code.

* the shipped file is weights only, float16, and the one its JSON manifest describes;
* ``tools/run_mindformer.py --config configs/deepseek1_5/predict_demo.yaml`` run from the repository
  root (as the README shows) loads it with no flag and greedily completes prompts into recognisable
  Python;
* its loss on held-out standard-library files (never trained on) is far below the loss of the same
  network at random initialisation (about ln(vocab));
* the recipe's packing and held-out split (tools/train_demo_model.py) behave as documented; the full
  recipe on a few steps runs in the slow suite.
"""
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "tools", "run_mindformer.py")
RECIPE = os.path.join(REPO, "tools", "train_demo_model.py")
PREDICT_DEMO = os.path.join(REPO, "configs", "deepseek1_5", "predict_demo.yaml")
DEMO_DIR = os.path.join(REPO, "mindformers_ext", "assets", "demo")
CKPT = os.path.join(DEMO_DIR, "deepseek_coder_demo.ckpt")
MANIFEST = os.path.join(DEMO_DIR, "deepseek_coder_demo.json")


def _recipe():
    spec = importlib.util.spec_from_file_location("train_demo_model", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest():
    with open(MANIFEST, encoding="utf-8") as f:
        return json.load(f)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("LOG_MF_PATH", None)  # each run logs under its output_dir
    env.setdefault("GLOG_v", "3")
    return env


def test_shipped_checkpoint_is_small_float16_weights_only():
    import mindspore as ms

    manifest = _manifest()
    with open(CKPT, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == manifest["sha256"]
    assert os.path.getsize(CKPT) < 10 * 2 ** 20
    state = ms.load_checkpoint(CKPT)
    recipe = _recipe()
    assert all(recipe.is_weight(name) for name in state), sorted(state)
    assert {v.dtype for v in state.values()} == {ms.float16}
    # tied embeddings: one (32256, hidden) matrix serves as input embedding and LM head
    assert state["model.tok_embeddings.embedding_weight"].shape[0] == 32256
    assert "lm_head.weight" not in state
    assert manifest["export"]["parameters"] == sum(int(np.prod(v.shape)) for v in state.values())


def test_readme_main_job_completes_python(tmp_path):
    """The README's command, from the repository root, with the YAML's default load_checkpoint."""
    # a literal \\n in a prompt is a newline, as users type it on the command line
    prompts = ["def __init__(self", "import os\\nimport", "    for i in range("]
    result = subprocess.run(
        [sys.executable, RUN, "--config", "configs/deepseek1_5/predict_demo.yaml", "--run_mode", "predict",
         "--predict_data", *prompts, "--predict_length", "24", "--output_dir", str(tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "randomly initialised" not in result.stdout + result.stderr
    with open(tmp_path / "predict_results.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    prompts = [p.replace("\\n", "\n") for p in prompts]
    assert [r["prompt"] for r in rows] == prompts
    texts = {r["prompt"]: r["text"] for r in rows}
    for prompt, text in texts.items():
        assert text.strip(), f"empty completion of {prompt!r}"
        assert text.isascii() and all(c.isprintable() or c in "\n\t" for c in text), (prompt, text)
    init = texts["def __init__(self"]
    assert "self." in init or ":" in init, init
    # the signature is completed into a valid def header
    header = ("def __init__(self" + init).split("\n")[0]
    compile(header + "\n    pass\n", "<demo>", "exec")
    # the next import names a (dotted) module, and the line is valid Python
    line = "import" + texts["import os\nimport"].split("\n")[0]
    assert re.fullmatch(r"import [A-Za-z_][\w.]*( as \w+)?(, *[A-Za-z_][\w.]*)*\s*", line), line
    compile(line, "<demo>", "exec")


def _heldout_chunks(seq_length: int, count: int) -> np.ndarray:
    """``count`` chunks of ``seq_length + 1`` tokens from the held-out stdlib files present here."""
    recipe = _recipe()
    root = recipe.stdlib_root()
    names = [n for n in _manifest()["data"]["heldout_files"] if os.path.isfile(os.path.join(root, n))]
    assert names, "none of the held-out files exists in this Python's standard library"
    texts = [recipe.clean_source(t) for t in (recipe.read_source(root, n) for n in names) if t is not None]
    chunks = recipe.pack_chunks(recipe.encode_documents(recipe.load_tokenizer(), texts), seq_length)
    assert len(chunks) >= count
    picks = np.linspace(0, len(chunks) - 1, count).astype(int)  # spread over the files
    return chunks[picks]


def test_heldout_loss_far_below_random_init():
    import mindspore as ms
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig

    from mindformers_ext import load_families
    load_families()  # our classes in MindFormers' registry
    from mindformers_ext.runner.predict import load_weights

    config = MindFormerConfig(PREDICT_DEMO)
    config.model.model_config.use_past = False
    seq = int(config.model.model_config.seq_length)
    vocab = int(config.model.model_config.vocab_size)
    tokens = ms.Tensor(_heldout_chunks(seq, 8), ms.int32)
    ms.set_seed(0)
    network = build_network(config.model)
    network.set_train(True)  # the loss path of construct; no gradients are taken
    random_loss = float(network(tokens).asnumpy())
    load_weights(network, CKPT)
    loss = float(network(tokens).asnumpy())
    assert abs(random_loss - math.log(vocab)) < 0.5, random_loss
    assert loss < 0.5 * random_loss, (loss, random_loss)
    assert loss < 4.5, loss


def test_recipe_packing_and_split():
    recipe = _recipe()
    chunks = recipe.pack_chunks([[1, 2, 3], [4, 5, 6, 7], [8, 9]], 3)
    assert chunks.tolist() == [[1, 2, 3, 4], [4, 5, 6, 7]]  # overlap of one token; short tail dropped
    assert chunks.dtype == np.int32
    with pytest.raises(ValueError):
        recipe.pack_chunks([[1, 2]], 4)
    source = ('#!/usr/bin/env python\n"""Module.\n\nMore.\n"""\n\n\n\n\nimport os  # inline\n\n'
              'def f(x):\n    """\n    Sum.\n\n    Long text.\n    """\n    # comment\n    return "#" + x\n')
    assert recipe.clean_source(source) == ('"""Module."""\n\n\nimport os\n\ndef f(x):\n    """Sum."""\n'
                                           '    return "#" + x\n')
    assert recipe.clean_source("def broken(:\n") == "def broken(:\n"  # unparsable: unchanged
    files = recipe.list_stdlib_files()
    assert files == sorted(files) and "os.py" in files and "json/decoder.py" in files
    assert not any(part in recipe.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
    train, heldout = recipe.split_files(files)
    assert heldout and set(train).isdisjoint(heldout) and len(train) + len(heldout) == len(files)
    assert all(recipe.is_heldout(f) for f in _manifest()["data"]["heldout_files"])


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path):
    """tools/train_demo_model.py on a few steps: data, training through run_mindformer, export, eval."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, RECIPE, "--steps", "4", "--eval_chunks", "4",
                             "--work_dir", str(tmp_path / "work"), "--output_dir", str(out)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "deepseek_coder_demo.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["recipe"]["steps"] == 4 and manifest["export"]["dtype"] == "float16"
    assert manifest["heldout_loss"] < manifest["random_init_loss"] + 0.5
    assert os.path.getsize(out / "deepseek_coder_demo.ckpt") == manifest["export"]["bytes"]
