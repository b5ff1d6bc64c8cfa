"""export_wizardcoder_inc.py: prefill + incremental decode graphs to MindIR, loaded back on CPU
(``mindspore.load`` + ``nn.GraphCell``), give the eager model's greedy ids."""
import json
import os

import numpy as np

from mindformers_ext import load_hf_model
from research.wizardcoder.export_wizardcoder_inc import DECODE, META, PREFILL, MindIRGenerator, export_incremental, main
from wizardcoder_util import make_tiny_bigcode


def test_exported_graphs_reproduce_eager_greedy_ids(tmp_path):
    hf_dir = make_tiny_bigcode(str(tmp_path / "hf"), seed=4)
    out_dir = str(tmp_path / "inc")
    assert main(["--hf_dir", hf_dir, "--output_dir", out_dir]) == 0
    assert {PREFILL, DECODE, META} <= set(os.listdir(out_dir))
    with open(os.path.join(out_dir, META), encoding="utf-8") as f:
        meta = json.load(f)
    # multi-query: K and V of one head per layer
    assert meta["cache_spec"] == {"tensors": [[1, 16], [1, 16]], "num_layers": 2, "int8": False}

    eager = load_hf_model(hf_dir, use_past=True)
    rng = np.random.RandomState(7)
    prompts = [rng.randint(1, 160, size=n).tolist() for n in (6, 11)]
    expected = eager.generate(prompts, max_new_tokens=32, eos_token_id=[])
    exported = MindIRGenerator(out_dir)
    got = exported.generate(prompts, max_new_tokens=32, eos_token_id=[])
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    # a single prompt of another length reuses the same (dynamic-shape) graphs
    single = exported.generate([prompts[0][:3]], max_new_tokens=8, eos_token_id=[])[0].tolist()
    assert single == eager.generate([prompts[0][:3]], max_new_tokens=8, eos_token_id=[])[0].tolist()


def test_export_after_generate_on_the_same_model(tmp_path):
    """A model whose generate compiled in-place cache writes (CPU) still exports the portable functional
    graphs: the MindIR returns the updated cache and reproduces the eager greedy ids."""
    model = load_hf_model(make_tiny_bigcode(str(tmp_path / "hf"), seed=5), use_past=True)
    prompts = [[5, 9, 14, 3], [7, 8]]
    expected = model.generate(prompts, max_new_tokens=12, eos_token_id=[])
    assert model._steps()["decode"].in_place  # pylint: disable=protected-access
    export_incremental(model, str(tmp_path / "inc"))
    got = MindIRGenerator(str(tmp_path / "inc")).generate(prompts, max_new_tokens=12, eos_token_id=[])
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
