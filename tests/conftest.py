"""Shared test set-up: CPU graph mode, MindFormers logs out of the tree, tiny HF reference models.

Each tiny HF model is built once per session (torch, random weights, saved as safetensors) and
reused; MindSpore graphs are compiled per model instance, so tests share model fixtures too.
"""
import contextlib
import fcntl
import os
import tempfile

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_test_logs"))
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402
import mindformers  # noqa: E402,F401  (these three imported before the heap is frozen below)
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

from mindformers_ext.runner.context import freeze_gc_heap  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=os.cpu_count() or 2)
ms.set_device("CPU")
# MindSpore collects garbage before compiling each graph; with the imports above frozen that takes
# microseconds instead of a quarter of a second (hundreds of graphs compile in a test session)
freeze_gc_heap()


@contextlib.contextmanager
def msrun_lock():
    """Held while a test runs a real msrun job: the jobs of every pytest process on this machine take
    turns. Ports are the machine's: the README msrun commands and the launcher's 1- and 2-argument forms
    give the scheduler fixed ports (8118, 9543), and MindSpore gives each worker of a running job 256
    ports from 8118 up (worker 0 takes 8118), so a job running anywhere takes 8118 from the next
    (tools/msrun_launcher.sh refuses to start that one)."""
    path = os.path.join(tempfile.gettempdir(), "mindformers_ext_tests_msrun.lock")
    with open(path, "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process entry points build MindFormers' context, which exports RUN_MODE, MS_ALLOC_CONF and friends;
    keep them out of the environment that later tests (and their subprocesses) inherit, so that no result
    depends on which tests ran before in the same worker."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


LLAMA_VARIANTS = {
    # theta 1e4, no scaling (DeepSeek-Coder v1.5 style)
    "v1_5": dict(rope_theta=10000.0),
    # theta 1e5 with linear scaling x4 (DeepSeek-Coder v1)
    "v1_linear": dict(rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0}),
    # grouped-query attention (DeepSeek-Coder 33B style)
    "gqa": dict(rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0}, num_key_value_heads=2),
    # dynamic NTK with a short table, so that decoding runs past it and the frequencies change per step
    "dynamic": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
    # YaRN (cos / sin scaled by its attention factor) beyond a 32-token original context
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                 max_position_embeddings=128),
}


def make_tiny_llama(path: str, seed: int = 0, sharp: bool = True, **overrides) -> str:
    """Save a tiny random HF LlamaForCausalLM (safetensors + config.json) under ``path``.

    ``sharp`` (default) re-initialises it with :func:`sharp_models.sharpen` (peaked attention, unit
    scale activations); otherwise HF's init with perturbed norm weights (a swapped norm would show).
    """
    import torch
    import transformers

    from sharp_models import sharpen

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    if sharp:
        sharpen(model)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dirs(tmp_path_factory):
    """{variant: HF checkpoint dir} for every entry of LLAMA_VARIANTS."""
    root = tmp_path_factory.mktemp("hf_llama")
    return {name: make_tiny_llama(str(root / name), seed=i, **kw) for i, (name, kw) in enumerate(LLAMA_VARIANTS.items())}
