"""End to end: an upstream MindFormers user's predict YAML (as shipped, shrunk with ``--a.b.c`` overrides)
and an upstream-converted checkpoint give HF generate's tokens through run_mindformer.py.

Until the runner carries the two hooks of issue 13 (translate the YAML; map upstream checkpoint layouts
while loading), the run goes through a launcher that installs them by patching
(``tests/upstream_util.HOOKED_RUN``); once they are in, through ``tools/run_mindformer.py`` itself.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from upstream_util import (HOOKED_RUN, deepseek2_upstream_tensors, llama_upstream_tensors, runner_has_upstream_hooks,
                           save_ms_checkpoint)
from wizardcoder_util import REPO

pytestmark = pytest.mark.slow  # two end-to-end predicts through tools/run_mindformer.py (about 30 s)

DATA = os.path.join(REPO, "tests", "data", "upstream")
PROMPT = "def quick_sort(arr):"
NEW = 8


def _runner(tmp_path):
    if runner_has_upstream_hooks():
        return os.path.join(REPO, "tools", "run_mindformer.py")
    script = tmp_path / "hooked_run.py"
    script.write_text(HOOKED_RUN, encoding="utf-8")
    return str(script)


def _predict(tmp_path, yaml_name, ckpt, *overrides):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3")
    env.pop("LOG_MF_PATH", None)
    out_dir = tmp_path / "out"
    run = subprocess.run([sys.executable, _runner(tmp_path), "--config", os.path.join(DATA, yaml_name),
                          "--use_parallel", "False", "--load_checkpoint", ckpt, "--predict_data", PROMPT,
                          "--predict_length", str(NEW), "--use_past", "True", "--output_dir", str(out_dir),
                          *overrides], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    with open(out_dir / "predict_results.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline()), output


def _hf_greedy(model, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _bf16_exact(model):
    """Round every weight to bfloat16 (upstream's DeepSeek-V2 checkpoints store most in bfloat16), so the
    upstream file holds HF's exact values; scale the head so greedy choices are no near-ties."""
    with torch.no_grad():
        model.lm_head.weight.mul_(32.0)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


DS2_TINY = ("--model.model_config.seq_length 64 --model.model_config.hidden_size 64 --model.model_config.num_layers 3 "
            "--model.model_config.num_heads 4 --model.model_config.max_position_embeddings 512 "
            "--model.model_config.intermediate_size 96 --model.model_config.kv_lora_rank 16 "
            "--model.model_config.q_lora_rank 32 --model.model_config.qk_rope_head_dim 8 "
            "--model.model_config.qk_nope_head_dim 8 --model.model_config.v_head_dim 12 "
            "--model.model_config.extend_method None --moe_config.expert_num 12 --moe_config.moe_intermediate_size 24 "
            "--moe_config.num_experts_chosen 2 --moe_config.shared_expert_num 1 --moe_config.n_group 4 "
            "--moe_config.topk_group 2 --moe_config.routed_scaling_factor 2.5").split()


def test_deepseek2_upstream_yaml_and_checkpoint_predict(tmp_path):
    """v1.5.0 predict_deepseek2_236B.yaml (auto_register deepseek2_model, LlamaTokenizerFast, MoE in a
    top-level moe_config) + an upstream-layout bfloat16 checkpoint: HF's greedy tokens."""
    import transformers

    from deepseek2_reference import TINY
    from mindformers_ext.tokenizers import tokenizer_path
    from sharp_models import sharpen

    torch.manual_seed(0)
    cfg = dict(TINY, vocab_size=102400, bos_token_id=100000, eos_token_id=100001, pad_token_id=100001)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg)).eval()
    sharpen(model)
    _bf16_exact(model)
    ckpt = save_ms_checkpoint(deepseek2_upstream_tensors(model.state_dict(), upstream_dtypes=True),
                              str(tmp_path / "deepseek2_up.ckpt"))
    tokenizer = os.path.join(tokenizer_path("deepseek-llm"), "tokenizer.json")
    row, output = _predict(tmp_path, "v1.5.0_predict_deepseek2_236B.yaml", ckpt, "--register_path",
                           os.path.join(REPO, "research", "deepseek2"), "--processor.tokenizer.tokenizer_file",
                           tokenizer, *DS2_TINY)
    assert "upstream MindFormers DeepSeek-V2 checkpoint layout" in output
    assert "'deepseek2_model.DeepseekV2ForCausalLM' -> removed" in output
    assert row["prompt_ids"][0] == 100000
    assert row["ids"] == _hf_greedy(model, row["prompt_ids"])


def test_deepseek_coder_upstream_yaml_predict(tmp_path):
    """v1.5.0 predict_deepseek_coder1_5_7b.yaml names LlamaForCausalLM / LlamaConfig / LlamaTokenizerFast
    (MindFormers' Llama fails on CPU): it runs as our DeepSeek-Coder with an upstream checkpoint."""
    import transformers

    from conftest import make_tiny_llama

    path = make_tiny_llama(str(tmp_path / "hf"), seed=5, vocab_size=102400, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512, bos_token_id=100000, eos_token_id=100015, pad_token_id=100001)
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    ckpt = save_ms_checkpoint(llama_upstream_tensors(model.state_dict()), str(tmp_path / "deepseek_up.ckpt"))
    tiny = ("--model.model_config.seq_length 64 --model.model_config.hidden_size 64 --model.model_config.num_layers 2 "
            "--model.model_config.num_heads 4 --model.model_config.n_kv_heads 4 --model.model_config.intermediate_size "
            "96 --model.model_config.max_position_embedding 512 --model.model_config.batch_size 1").split()
    row, output = _predict(tmp_path, "v1.5.0_predict_deepseek_coder1_5_7b.yaml", ckpt, *tiny)
    assert "'LlamaForCausalLM' -> 'DeepSeekCoderForCausalLM'" in output
    assert row["ids"] == _hf_greedy(model, row["prompt_ids"])
