"""`mindformers_ext.load_families()` makes our YAML type names resolve through MindFormers' registry;
`import mindformers_ext` alone imports nothing from research/ (dependencies point one way)."""
import json
import os
import subprocess
import sys

from mindformers.models.build_model import build_network
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

from mindformers_ext import load_families

load_families()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_package_imports_no_research_module():
    code = ("import json, sys; import mindformers_ext, mindformers_ext.serving, mindformers_ext.convert; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'research' or m.startswith('research.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_module_of_the_package_imports_research():
    """Not even inside a function: the package reaches research/ only through the Family records."""
    import ast

    offenders = []
    for root, _, files in os.walk(os.path.join(REPO, "mindformers_ext")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read(), path)
            for node in ast.walk(tree):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{os.path.relpath(path, REPO)}:{node.lineno} {m}" for m in modules
                              if m == "research" or m.startswith("research.")]
    assert offenders == []


def test_importing_the_package_imports_no_mindformers():
    """``import mindformers_ext`` (and its preprocessing and tokenizer-backend parts) stays light: MindSpore
    and MindFormers are imported by what needs them."""
    code = ("import json, sys; import mindformers_ext, mindformers_ext.data, mindformers_ext.tokenizers.backend; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'mindformers', 'mindspore'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_family_is_registered_once_with_its_classes():
    families = load_families()
    assert sorted((f.hf_model_type, f.weight_map) for f in families.values()) == [
        ("deepseek_v2", "deepseek2"), ("gpt_bigcode", "wizardcoder"), ("llama", "deepseek")]
    for name, family in families.items():
        assert family.config_class.model_type == name
        assert MindFormerRegister.is_exist(MindFormerModuleType.MODELS, family.model_class.__name__)
        assert MindFormerRegister.is_exist(MindFormerModuleType.TOKENIZER, family.tokenizer_class.__name__)


def test_research_classes_are_registered():
    for kind, name in ((MindFormerModuleType.MODELS, "DeepSeekCoderForCausalLM"),
                       (MindFormerModuleType.CONFIG, "DeepSeekCoderConfig"),
                       (MindFormerModuleType.MODELS, "LlamaFamilyForCausalLM"),
                       (MindFormerModuleType.TOKENIZER, "DeepSeekCoderTokenizer"),
                       (MindFormerModuleType.TOKENIZER, "WizardCoderTokenizer")):
        assert MindFormerRegister.is_exist(kind, name), name


def test_yaml_types_build_our_model():
    config = MindFormerConfig(**{"model": {
        "model_config": {"type": "DeepSeekCoderConfig", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                         "intermediate_size": 48, "vocab_size": 100, "seq_length": 16},
        "arch": {"type": "DeepSeekCoderForCausalLM"}}})
    network = build_network(config.model)
    assert type(network).__name__ == "DeepSeekCoderForCausalLM"
    assert network.config.hidden_size == 32 and network.config.theta == 10000.0
    names = {name for name, _ in network.parameters_and_names()}
    assert "model.layers.1.attention.wq.weight" in names and "lm_head.weight" in names


def test_config_fields_that_do_not_apply_say_so(monkeypatch):
    """No field is accepted and silently ignored: a non-silu Llama activation is an error; the
    upstream YAMLs' use_flash_attention: True and a non-float32 rotary_dtype are reported as unused."""
    import pytest

    from mindformers_ext.models import base_config
    from mindformers_ext.models.llama_config import LlamaFamilyConfig

    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaFamilyConfig(hidden_act="gelu")
    messages = []

    class Recorder:
        @staticmethod
        def warning(msg, *args):
            messages.append(msg % args)

    monkeypatch.setattr(base_config, "logger", Recorder)
    LlamaFamilyConfig(use_flash_attention=True, rotary_dtype="bfloat16")
    assert any("use_flash_attention: True has no effect" in m for m in messages), messages
    assert any("rotary_dtype: bfloat16 is not used" in m for m in messages), messages
    messages.clear()
    LlamaFamilyConfig()
    assert not messages
