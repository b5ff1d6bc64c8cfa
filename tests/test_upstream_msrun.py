"""Issue 13: ``--load_checkpoint DIR`` holding ``rank_N/`` folders (upstream's distributed layout) under
msrun: each worker loads the folder of the rank that msrun gave it, not ``rank_0``.

Two CPU workers (data parallel), ``rank_0/`` and ``rank_1/`` holding different files with different
weights; each worker's "loaded N weights from FILE" line must name its own file and no other.
"""
import os
import re

import numpy as np
import pytest

from test_msrun_checkpoint import _launch, free_port
from test_run_mindformer import FINETUNE_TINY, RUN, write_tiny_mindrecord

SEQ = 16
COMMON = ["--config", FINETUNE_TINY, "--run_mode", "finetune", "--epochs", "1",
          "--model.model_config.vocab_size", "512", "--model.model_config.seq_length", str(SEQ),
          "--runner_config.batch_size", "2"]
LOADED = re.compile(r"loaded (\d+) weights from (\S+)")


def _tiny_model():
    from mindformers.tools.register import MindFormerConfig
    from research.deepseek1_5.deepseek1_5 import DeepSeekCoderForCausalLM
    from research.deepseek1_5.deepseek1_5_config import DeepSeekCoderConfig

    config = dict(MindFormerConfig(FINETUNE_TINY).model.model_config)
    config.pop("type")
    config.update(vocab_size=512, seq_length=SEQ)
    return DeepSeekCoderForCausalLM(DeepSeekCoderConfig(**config))


@pytest.mark.slow
def test_each_msrun_worker_loads_its_rank_folder(tmp_path):
    import mindspore as ms

    data = write_tiny_mindrecord(tmp_path / "train.mindrecord", samples=4, seq_length=SEQ, seed=3)
    model = _tiny_model()
    files = {}
    for rank in (0, 1):
        rng = np.random.default_rng(100 + rank)
        for p in model.get_parameters():
            p.set_data(ms.Tensor((0.05 * rng.standard_normal(p.shape)).astype(np.float32)))
        folder = tmp_path / "ckpt" / f"rank_{rank}"
        folder.mkdir(parents=True)
        files[rank] = str(folder / f"weights_of_rank{rank}.ckpt")
        ms.save_checkpoint(model, files[rank])
    out = tmp_path / "out"
    cmd = (f"{RUN} {' '.join(COMMON)} --use_parallel True --train_data {data} --output_dir {out} "
           f"--load_checkpoint {tmp_path / 'ckpt'}/")
    result = _launch(cmd, "2", str(free_port()), str(tmp_path / "msrun_log"), "True", "300", cwd=str(tmp_path))
    logs = {r: (tmp_path / "msrun_log" / f"worker_{r}.log").read_text(errors="replace") for r in (0, 1)}
    assert result.returncode == 0, result.stderr[-3000:] + logs[0][-3000:] + logs[1][-3000:]
    for rank, log in logs.items():
        loaded = LOADED.findall(log)
        assert [os.path.realpath(f) for _, f in loaded] == [os.path.realpath(files[rank])], (rank, loaded)
