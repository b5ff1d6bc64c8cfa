"""Upstream MindFormers YAMLs (tests/data/upstream/, fetched from mindspore-lab/mindformers tags v1.3.2,
v1.5.0-beta2 and v1.5.0, unmodified below a source header) translated to what runs here; the static
parallel check reads them as the runner does (moe_config included) and refuses to pass vacuously."""
import copy
import glob
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from mindformers.tools.register import MindFormerModuleType as T
from mindformers.tools.register import MindFormerRegister

from mindformers_ext import load_families
from mindformers_ext.parallel import ParallelCheckError, check_parallel
from mindformers_ext.parallel.yaml_check import check_yaml
from mindformers_ext.upstream import migrate_file, translate_config

load_families()  # our classes in MindFormers' registry, as the runner has them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "upstream")
FIXTURES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DATA, "*.yaml")))
OURS = sorted(glob.glob(os.path.join(REPO, "research", "*", "*.yaml")) + glob.glob(os.path.join(REPO, "configs", "*",
                                                                                                   "*.yaml")))
_OBS = "callbacks.2.type, eval_callbacks.0.type"
# the substitutions each upstream YAML needs (key -> new value; None: removed)
EXPECTED = {
    "v1.3.2_predict_deepseek2_236B.yaml": {"processor.tokenizer.type": "DeepSeekCoderTokenizer", _OBS: None},
    "v1.5.0-beta2_finetune_wizardcoder_15b_bf16.yaml": {_OBS: None, "optimizer.type": "AdamW",
                                                         "parallel_config.vocab_emb_dp": True},
    "v1.5.0-beta2_predict_wizardcoder_15b_fp16.yaml": {_OBS: None, "optimizer.type": "AdamW"},
    "v1.5.0_finetune_deepseek2_236B.yaml": {"processor.tokenizer.type": "DeepSeekCoderTokenizer",
                                            "model.model_config.auto_register": None,
                                            "model.arch.auto_register": None, _OBS: None},
    "v1.5.0_predict_deepseek2_236B.yaml": {"processor.tokenizer.type": "DeepSeekCoderTokenizer",
                                           "model.model_config.auto_register": None,
                                           "model.arch.auto_register": None},
    "v1.5.0_finetune_deepseek_coder1_5_7b.yaml": {"model.arch.type": "DeepSeekCoderForCausalLM",
                                                  "model.model_config.type": "DeepSeekCoderConfig",
                                                  "processor.tokenizer.type": "DeepSeekCoderTokenizer", _OBS: None},
    "v1.5.0_predict_deepseek_coder1_5_7b.yaml": {"model.arch.type": "DeepSeekCoderForCausalLM",
                                                 "model.model_config.type": "DeepSeekCoderConfig",
                                                 "processor.tokenizer.type": "DeepSeekCoderTokenizer", _OBS: None},
}
# YAML place of a `type` -> MindFormers registry kind
_KINDS = (("model.arch", T.MODELS), ("model.model_config", T.CONFIG), ("processor", T.PROCESSOR),
          ("processor.tokenizer", T.TOKENIZER), ("optimizer", T.OPTIMIZER), ("lr_schedule", T.LR),
          ("runner_wrapper", T.WRAPPER), ("trainer", T.TRAINER), ("metric", T.METRIC),
          ("train_dataset_task", T.DATASET), ("eval_dataset_task", T.DATASET),
          ("train_dataset.data_loader", T.DATASET_LOADER), ("eval_dataset.data_loader", T.DATASET_LOADER))


def _load(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


def _unresolved(raw):
    """`type`s the MindFormers 1.9 registry (with our classes) cannot build, as 'key: type'."""
    missing = []
    for path, kind in _KINDS:
        node = raw
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get("type") and not MindFormerRegister.is_exist(kind, node["type"]):
            missing.append(f"{path}: {node['type']}")
    for key in ("callbacks", "eval_callbacks"):
        for i, item in enumerate(raw.get(key) or []):
            if not MindFormerRegister.is_exist(T.CALLBACK, item.get("type")):
                missing.append(f"{key}.{i}: {item.get('type')}")
    for path in ("model.model_config", "model.arch"):
        node = raw["model"][path.split(".")[1]]
        if "auto_register" in node:
            missing.append(f"{path}.auto_register: {node['auto_register']}")
    return missing


def test_fixtures_are_upstream_files_with_their_source():
    assert sorted(EXPECTED) == FIXTURES
    for name in FIXTURES:
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            first = f.readline()
        tag = name.split("_", 1)[0]
        assert first.startswith(f"# source: github.com/mindspore-lab/mindformers tag {tag}, file research/"), name


@pytest.mark.parametrize("name", FIXTURES)
def test_upstream_yaml_translates_to_registered_types(name):
    """Each upstream YAML: the expected substitutions, each logged once as a warning naming the file,
    the key, the old and the new value; afterwards every type resolves in MindFormers 1.9 + ours."""
    raw = _load(name)
    before = _unresolved(raw)
    warnings, infos = [], []
    changes = translate_config(raw, name, warn=warnings.append, info=infos.append)
    assert {c.key: c.new for c in changes if c.substitution} == EXPECTED[name]
    assert len(warnings) == len(EXPECTED[name]) == len(set(warnings))
    for change, line in zip([c for c in changes if c.substitution], warnings):
        assert line.startswith(f"{name}: {change.key}: {change.old!r} -> ")
        assert ("removed" if change.new is None else repr(change.new)) in line
    assert before and _unresolved(raw) == []  # as shipped it does not build here; translated it does
    assert translate_config(raw, name, warn=warnings.append, info=infos.append) == []  # idempotent


@pytest.mark.parametrize("path", OURS, ids=lambda p: os.path.relpath(p, REPO))
def test_our_yamls_pass_through_unchanged(path):
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    original = copy.deepcopy(raw)
    assert translate_config(raw, path, warn=pytest.fail, info=pytest.fail) == []
    assert raw == original


def test_moe_config_reaches_the_model_config():
    """DeepSeek-V2 upstream YAMLs keep MoE settings in a top-level moe_config, which only MindFormers'
    Trainer passed on; translated, the model config itself holds them (predict and eval build from it)."""
    from research.deepseek2 import DeepseekV2Config

    raw = _load("v1.5.0_predict_deepseek2_236B.yaml")
    raw["moe_config"].update(expert_num=64, num_experts_chosen=4, n_group=4, topk_group=2)
    fields = {k: v for k, v in raw["model"]["model_config"].items() if k not in ("type", "auto_register")}
    assert DeepseekV2Config(**fields).n_routed_experts == 160  # untranslated: the 236B default, silently
    infos = []
    translate_config(raw, "predict.yaml", warn=infos.append, info=infos.append)
    fields = {k: v for k, v in raw["model"]["model_config"].items() if k != "type"}
    config = DeepseekV2Config(**fields)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group) == (64, 4, 4, 2)
    assert any("moe_config" in m for m in infos)
    # an explicit model_config field that contradicts moe_config is reported, naming both keys
    raw = _load("v1.5.0_predict_deepseek2_236B.yaml")
    raw["model"]["model_config"]["n_routed_experts"] = 8
    warnings = []
    translate_config(raw, "x.yaml", warn=warnings.append, info=lambda m: None)
    assert any("moe_config.expert_num 160 vs model.model_config.n_routed_experts 8" in m for m in warnings)


def test_check_parallel_reads_moe_config(tmp_path):
    """expert_num 10 in moe_config with expert_parallel 4: refused (it printed 'ok' when moe_config was ignored)."""
    raw = _load("v1.5.0_finetune_deepseek2_236B.yaml")
    raw["moe_config"].update(expert_num=10)
    path = tmp_path / "ds2_e10.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ValueError, match=r"ds2_e10\.yaml: model\.model_config \(DeepseekV2Config, with moe_config\): "
                                         r"n_routed_experts \(10\) must be divisible by n_group \(8\)"):
        check_yaml(str(path))
    raw["moe_config"].update(n_group=2, topk_group=2)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ParallelCheckError, match=r"expert_parallel \(4\) must divide n_routed_experts \(10\)"):
        check_yaml(str(path))


def test_check_parallel_accepts_upstream_layouts():
    """Upstream's DeepSeek-Coder YAML (LlamaForCausalLM) is checked as our model (909 strategies, not 0),
    and WizardCoder's mp 4 with vocab 49153 passes with the replicated embedding / head."""
    summary = check_yaml(os.path.join(DATA, "v1.5.0_finetune_deepseek_coder1_5_7b.yaml"))
    assert int(summary[1].split()[0]) > 0
    summary = check_yaml(os.path.join(DATA, "v1.5.0-beta2_finetune_wizardcoder_15b_bf16.yaml"))
    assert summary[0].startswith("dp=1 mp=4 pp=2") and int(summary[1].split()[0]) > 0


def test_check_parallel_fails_when_nothing_was_checked(tmp_path):
    """A model that records no strategy (MindFormers' own classes) is an error, not 'ok'."""
    from mindspore import nn

    cell = nn.Dense(4, 4)
    cell.config = SimpleNamespace(parallel_config={"data_parallel": 1, "model_parallel": 2}, num_layers=1,
                                  batch_size=1, seq_length=8)
    with pytest.raises(ParallelCheckError, match="no shard strategy was checked: Dense records none"):
        check_parallel(cell, 2)
    raw = _load("v1.5.0_predict_deepseek_coder1_5_7b.yaml")  # a Llama YAML that is not DeepSeek-Coder's
    raw["trainer"]["model_name"] = "llama2_7b"
    raw["model"]["model_config"]["vocab_size"] = 32000
    raw["processor"]["tokenizer"]["bos_token"] = "<s>"
    path = tmp_path / "llama2.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_parallel.py"), "--config", str(path)],
                         capture_output=True, text=True, check=False, cwd=str(tmp_path))
    assert run.returncode == 1 and "ok" not in run.stdout.split()
    assert "llama2.yaml: model.arch.type 'LlamaForCausalLM' is MindFormers' own" in run.stderr


def test_migrate_config_writes_a_clean_yaml(tmp_path):
    """tools/migrate_config.py OLD NEW: the translated YAML, with a header listing the changes; migrating
    it again changes nothing."""
    new = tmp_path / "finetune.yaml"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "migrate_config.py"),
                          os.path.join(DATA, "v1.5.0-beta2_finetune_wizardcoder_15b_bf16.yaml"), str(new)],
                         capture_output=True, text=True, check=False, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    text = new.read_text(encoding="utf-8")
    assert text.startswith("# migrated from v1.5.0-beta2_finetune_wizardcoder_15b_bf16.yaml")
    assert "optimizer.type: 'FP32StateAdamWeightDecay' -> 'AdamW'" in text
    raw = yaml.safe_load(text)
    assert raw["optimizer"]["type"] == "AdamW" and raw["optimizer"]["betas"] == [0.9, 0.999]
    assert _unresolved(raw) == []
    assert migrate_file(str(new), str(tmp_path / "again.yaml"), warn=pytest.fail) == []


def test_wizardcoder_config_replicates_an_indivisible_vocab():
    """Without the YAML translation too (API users): WizardCoderConfig with vocab 49153 and model parallel 4
    replicates the embedding / head (the caller's parallel config untouched) and the layout passes."""
    from mindformers_ext.parallel import build_skeleton
    from research.wizardcoder import WizardCoderConfig, WizardCoderForCausalLM

    parallel = dict(data_parallel=1, model_parallel=4, pipeline_stage=2, micro_batch_num=8, vocab_emb_dp=False)
    config = WizardCoderConfig(parallel_config=parallel, batch_size=1)
    assert config.parallel_config.vocab_emb_dp is True and parallel["vocab_emb_dp"] is False
    assert check_parallel(build_skeleton(WizardCoderForCausalLM, config), 8)[0].startswith("dp=1 mp=4 pp=2")
    divisible = WizardCoderConfig(vocab_size=49152, parallel_config=parallel, batch_size=1)
    assert divisible.parallel_config.vocab_emb_dp is False  # split as asked where it divides


def test_register_path_auto_register_finds_deepseek2_model(tmp_path):
    """Untranslated, MindFormers' own auto_register of 'deepseek2_model.DeepseekV2ForCausalLM' (v1.5.0 YAMLs
    with --register_path research/deepseek2) resolves to our model class."""
    code = ("import mindformers_ext\n"
            "mindformers_ext.load_families()\n"
            "from mindformers.tools.register import MindFormerRegister as R, MindFormerModuleType as T\n"
            "R.registry[T.MODELS].pop('DeepseekV2ForCausalLM')  # so that only auto_register can put it back\n"
            "R.auto_register(class_reference='deepseek2_model.DeepseekV2ForCausalLM', module_type=T.MODELS)\n"
            "cls = R.get_cls(T.MODELS, 'DeepseekV2ForCausalLM')\n"
            "from research.deepseek2 import DeepseekV2ForCausalLM\n"
            "print('same' if cls is DeepseekV2ForCausalLM else cls)\n")
    env = dict(os.environ, REGISTER_PATH=os.path.join(REPO, "research", "deepseek2"), HOME=str(tmp_path),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env,
                         cwd=str(tmp_path))
    # MindSpore may log after the script's last line (its allocator's configuration at exit)
    assert run.returncode == 0 and "same" in run.stdout.splitlines(), run.stdout[-2000:] + run.stderr[-2000:]
