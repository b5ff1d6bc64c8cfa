"""Issue 13, commands: upstream MindFormers' command spellings run here or say what to run instead.

UPSTREAM_COMMANDS lists the command lines of upstream's ``research/deepseek1_5`` and
``research/deepseek2`` READMEs and converter scripts (tags v1.3.2, v1.5.0-beta2, v1.5.0) that the
documented-commands test does not already run, as upstream spelled them (script paths moved into
``research/``, paths replaced by tiny stand-ins; the tiny shapes need ``--config``, which the released sizes do not). Each either works (the check looks at its output)
or fails with a one-line error naming what to run instead. No network: the spellings are test data.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np

import pytest

from upstream_util import deepseek2_upstream_tensors, save_ms_checkpoint
from wizardcoder_util import REPO

DS15 = os.path.join(REPO, "research", "deepseek1_5")
DS2 = os.path.join(REPO, "research", "deepseek2")
ALPACA = [{"instruction": "Write a function that adds two numbers.", "input": "", "output": "def add(a, b):\n"
           "    return a + b"},
          {"instruction": "Reverse a list.", "input": "xs = [1, 2, 3]", "output": "xs[::-1]"}]
WIKI = (" = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : "
        "戦場のヴァルキュリア3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical "
        "role @-@ playing video game developed by Sega . It sold 1 @,@ 000 @.@ 5 units .\n\n = = Gameplay = = \n\n"
        " As with previous games , the player 's units fight in \" battles \" ; the story is told .\n\n")
# WIKI's paragraphs as plain text (headings dropped), written out by hand
WIKI_TEXT = ["Senjō no Valkyria 3: Unrecorded Chronicles (Japanese: 戦場のヴァルキュリア3), commonly referred to as "
             "Valkyria Chronicles III outside Japan, is a tactical role-playing video game developed by Sega. It sold "
             "1,000.5 units .",
             "As with previous games, the player's units fight in \"battles\"; the story is told ."]

# (where upstream spells it, the command with {placeholders}, expected: "ok" or a phrase of the error)
UPSTREAM_COMMANDS = [
    ("v1.5.0 deepseek1_5/README.md, preprocess step 1",
     "python {ds15}/alpaca_converter.py --data_path {alpaca} --output_path {tmp}/alpaca-data-converted.json", "ok"),
    ("v1.5.0 deepseek1_5/README.md, preprocess step 2 (on step 1's output)",
     "python {ds15}/alpaca_converter.py --data_path {alpaca} --output_path {tmp}/alpaca-data-converted.json && "
     "python {ds15}/deepseek_preprocess_1_5.py --dataset_type qa --input_glob {tmp}/alpaca-data-converted.json "
     "--seq_length 128 --output_file {tmp}/alpaca_finetune_4k.mindrecord", "ok"),
    ("v1.3.2 - v1.5.0 deepseek_preprocess_1_5.py --dataset_type wiki (its default type)",
     "python {ds15}/deepseek_preprocess_1_5.py --dataset_type wiki --input_glob {wiki} --seq_length 16 "
     "--output_file {tmp}/wiki2048/wiki2048", "ok"),
    ("v1.3.2 deepseek2.md / v1.5.0 README.md, convert",
     "python {ds2}/convert_weight.py --torch_ckpt_path {hf} --mindspore_ckpt_path {tmp}/ds2.ckpt", "ok"),
    ("v1.5.0 convert_weight.py: --num_routed_experts and the (required) positional flag",
     "python {ds2}/convert_weight.py --num_routed_experts {experts} --torch_ckpt_path {hf} "
     "--mindspore_ckpt_path {tmp}/ds2.ckpt --dtype bf16 False", "ok"),
    ("v1.5.0 convert_weight.py: --num_routed_experts 160 (its default) for another size",
     "python {ds2}/convert_weight.py --num_routed_experts 160 --torch_ckpt_path {hf} "
     "--mindspore_ckpt_path {tmp}/ds2.ckpt", "has {experts} routed experts"),
    ("v1.5.0 convert_weight.py: second pass over its own output",
     "python {ds2}/convert_weight.py --pre_ckpt_path {upstream} --mindspore_ckpt_path {tmp}/ours.ckpt "
     "--num_routed_experts {experts} --config {hf}/config.json", "ok"),
    ("v1.5.0 convert_weight.py: second pass over rank_N/ folders",
     "python {ds2}/convert_weight.py --pre_ckpt_path {upstream_dir} --mindspore_ckpt_path {tmp}/ours_dir "
     "--config {hf}/config.json", "ok"),
    ("v1.5.0 convert_weight.py: --use_gmm",
     "python {ds2}/convert_weight.py --use_gmm --pre_ckpt_path {upstream} --mindspore_ckpt_path {tmp}/gmm.ckpt",
     "--use_gmm: upstream's grouped-matmul expert layout"),
    ("v1.5.0 convert_weight.py: MLA weight split",
     "python {ds2}/convert_weight.py --pre_ckpt_path {upstream} --mindspore_ckpt_path {tmp}/split.ckpt "
     "--n_head 4 --qk_nope_head_dim 16 --qk_rope_head_dim 8 --v_head_dim 16 True", "MLA weight split"),
]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Paths the commands' placeholders stand for."""
    from deepseek2_reference import make_tiny_deepseek2

    root = tmp_path_factory.mktemp("upstream_cmds")
    hf = str(root / "DeepSeek-V2-Lite")
    state = make_tiny_deepseek2(hf, "lite", seed=5)
    with open(os.path.join(hf, "config.json"), encoding="utf-8") as f:
        experts = json.load(f)["n_routed_experts"]
    upstream = save_ms_checkpoint(deepseek2_upstream_tensors(state), str(root / "upstream.ckpt"))
    for rank in (0, 1):
        os.makedirs(root / "upstream_dir" / f"rank_{rank}")
        save_ms_checkpoint(deepseek2_upstream_tensors(state),
                           str(root / "upstream_dir" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))
    alpaca = root / "code_alpaca_20k.json"
    alpaca.write_text(json.dumps(ALPACA), encoding="utf-8")
    wiki = root / "wiki.train.tokens"
    wiki.write_text(WIKI * 3, encoding="utf-8")
    return {"ds15": DS15, "ds2": DS2, "hf": hf, "experts": experts, "upstream": upstream,
            "upstream_dir": str(root / "upstream_dir"), "alpaca": str(alpaca), "wiki": str(wiki), "state": state}


def _run(command: str, cwd: str) -> subprocess.CompletedProcess:
    """Run ``python ...`` (or several joined by ``&&``, each of which but the last must succeed)."""
    *before, last = command.split(" && ")
    for step in before:
        run = _run(step, cwd)
        assert run.returncode == 0, f"{step}:\n{run.stderr}"
    args = last.split()
    assert args[0] == "python"
    return subprocess.run([sys.executable] + args[1:], cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False)


def _ckpt_names(path: str) -> set:
    from mindformers_ext.convert import read_ckpt_index

    return {e.name for e in read_ckpt_index(path)}


def _mindrecord_rows(path: str) -> list:
    from mindspore.mindrecord import FileReader

    reader = FileReader(path)
    try:
        return list(reader.get_next())
    finally:
        reader.close()


@pytest.mark.slow  # one subprocess each (about 75 s together); the README commands test covers ours by default
@pytest.mark.parametrize("where,command,expected", UPSTREAM_COMMANDS, ids=[c[0] for c in UPSTREAM_COMMANDS])
def test_upstream_command(where, command, expected, stand_ins, tmp_path):
    values = dict(stand_ins, tmp=str(tmp_path))
    run = _run(command.format(**values), str(tmp_path))
    if expected != "ok":
        assert run.returncode != 0, f"{where}: accepted\n{run.stdout}\n{run.stderr}"
        errors = [line for line in run.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and expected.format(**values) in errors[0], f"{where}:\n{run.stderr}"
        assert "Traceback" not in run.stderr
        return
    assert run.returncode == 0, f"{where}:\n{run.stdout}\n{run.stderr}"
    if command.startswith("python {ds15}/alpaca_converter.py") and "&&" not in command:  # records as they were
        with open(tmp_path / "alpaca-data-converted.json", encoding="utf-8") as f:
            assert json.load(f) == ALPACA
    elif "--dataset_type qa" in command:  # the two-step form writes what the one-step form writes
        one_step = _run(f"python {DS15}/deepseek_preprocess_1_5.py --dataset_type qa --input_glob "
                        f"{stand_ins['alpaca']} --seq_length 128 --output_file {tmp_path}/one_step.mindrecord",
                        str(tmp_path))
        assert one_step.returncode == 0, one_step.stderr
        two = _mindrecord_rows(str(tmp_path / "alpaca_finetune_4k.mindrecord"))
        one = _mindrecord_rows(str(tmp_path / "one_step.mindrecord"))
        assert len(two) == len(ALPACA) == len(one)
        for a, b in zip(two, one):
            assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
    elif "--dataset_type wiki" in command:
        _check_wiki(str(tmp_path / "wiki2048" / "wiki2048"))
    elif "--pre_ckpt_path" in command:  # migrated to our layout: loads plainly with HF's logits
        outs = ([str(tmp_path / "ours.ckpt")] if "ours.ckpt" in command else
                [str(tmp_path / "ours_dir" / f"rank_{r}" / f"checkpoint_{r}.ckpt") for r in (0, 1)])
        for out in outs:
            _check_logits(out, stand_ins)
    else:
        names = _ckpt_names(str(tmp_path / "ds2.ckpt"))
        assert "model.layers.1.feed_forward.ffn.w1" in names


def _check_wiki(output: str):
    """Headings dropped, WikiText detokenised, each paragraph BOS ... <|EOT|>, cut into 17-token rows."""
    from mindformers_ext.tokenizers.deepseek import DeepSeekCoderTokenizer

    tok = DeepSeekCoderTokenizer()
    eot = tok.convert_tokens_to_ids("<|EOT|>")
    stream = []
    for text in WIKI_TEXT * 3:
        stream += tok.encode(text, add_special_tokens=True) + [eot]
    rows = _mindrecord_rows(output)
    expected = [stream[i:i + 17] for i in range(0, len(stream) - 16, 17)]
    assert len(rows) == len(expected) > 0
    for row, want in zip(rows, expected):
        assert row["input_ids"].tolist() == want and row["labels"].tolist() == want


def _check_logits(ckpt: str, stand_ins: dict):
    import torch
    import transformers

    import mindspore as ms
    from mindformers_ext.checkpoint import load_checkpoint_into
    from mindformers_ext.hf_loader import build_from_hf_config, read_hf_config
    from deepseek2_reference import one_torch_thread

    assert not any("routed_experts" in n for n in _ckpt_names(ckpt))
    model, _ = build_from_hf_config(read_hf_config(stand_ins["hf"]), use_past=False, compute_dtype="float32",
                                    param_init_type="float32")
    model.set_train(False)
    load_checkpoint_into(model, ckpt)
    ids = np.random.RandomState(2).randint(3, 160, size=(1, 13)).astype(np.int32)
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(stand_ins["hf"]).eval()
    with torch.no_grad(), one_torch_thread():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - want).max() <= 1e-4


def test_conversation_records_name_the_converter(tmp_path):
    """A file that upstream's alpaca_converter.py wrote (prompt baked into "conversations") is refused with
    what to pass instead, not with "missing key 'instruction'"."""
    upstream_out = tmp_path / "alpaca-data-conversation.json"
    upstream_out.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "q"},
                                                                      {"from": "gpt", "value": "a"}]}]))
    run = _run(f"python {DS15}/deepseek_preprocess_1_5.py --dataset_type qa --input_glob {upstream_out} "
               f"--seq_length 128 --output_file {tmp_path}/x.mindrecord", str(tmp_path))
    assert run.returncode == 1
    assert "'conversations' record" in run.stderr and "alpaca_converter.py --data_path" in run.stderr
    assert not os.path.exists(tmp_path / "x.mindrecord")


@pytest.mark.parametrize("upstream_path, ours", [
    ("research/deepseek2/deepseek2_236b/finetune_deepseek2_236B.yaml", "research/deepseek2/finetune_deepseek2_236B.yaml"),
    ("research/deepseek2/run_train_deepseek2_236B.yaml", "research/deepseek2/finetune_deepseek2_236B.yaml"),
    ("deepseek1_5_7b/predict_deepseek_coder1_5_7b.yaml", "research/deepseek1_5/predict_deepseek_coder1_5_7b.yaml"),
])
def test_upstream_yaml_paths_name_the_shipped_file(upstream_path, ours):
    """Upstream READMEs put the YAMLs in per-model sub-folders or use older names: the error names ours."""
    from mindformers_ext.runner.config import ConfigError, load_yaml

    with pytest.raises(ConfigError, match="did you mean .*" + re.escape(ours)):
        load_yaml(upstream_path)
