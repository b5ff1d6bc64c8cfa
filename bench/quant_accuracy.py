"""Accuracy and size of W8A16 weights and the int8 KV cache, against float32. One JSON line per result.

* ``bytes``: the weights W8A16 quantizes (linear layers, MoE experts; not the LM head, embedding,
  norms, routers) as int8 + float32 scales against their float32 bytes, and the whole checkpoint,
  for the demo model and the full-size presets (computed on weightless skeletons: nothing allocated);
* ``agreement``: greedy decode (KV cache) of the demo model (configs/deepseek1_5/predict_demo.yaml,
  trained on Python's standard library) from held-out prompts, W8A16 / int8 KV / both against float32:
  the fraction of new tokens identical at the same position and each prompt's first divergence. The
  demo's context is 256 positions, so each prompt (32 tokens) gets 224 new tokens; 4 prompts;
* ``heldout_loss``: mean next-token loss on the demo's held-out files (the split of
  tools/train_demo_model.py, read from this Python's standard library), teacher-forced through the KV
  cache (one prompt token prefilled, then every token decoded over the cache, so the int8 cache is
  read for every prediction but the first), and its change relative to float32.

    python bench/quant_accuracy.py                  # everything (about a minute on 2 cores)
    python bench/quant_accuracy.py --skip agreement
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

os.environ.setdefault("LOG_MF_PATH", os.path.join(tempfile.gettempdir(), "mindformers_ext_bench_logs"))
os.environ.setdefault("GLOG_v", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

PREDICT_DEMO = os.path.join(REPO, "configs", "deepseek1_5", "predict_demo.yaml")
DEMO_DIR = os.path.join(REPO, "mindformers_ext", "assets", "demo")
RECIPE = os.path.join(REPO, "tools", "train_demo_model.py")
VARIANTS = {"float32": (False, False), "w8a16": (True, False), "kv_int8": (False, True), "w8a16+kv_int8": (True, True)}
PRESETS = (("research.deepseek1_5", "DeepSeekCoderForCausalLM", "DeepSeekCoderConfig", "deepseek-coder-7b-v1.5"),
           ("research.deepseek2", "DeepseekV2ForCausalLM", "DeepseekV2Config", "deepseek-v2-lite"),
           ("research.wizardcoder", "WizardCoderForCausalLM", "WizardCoderConfig", "wizardcoder-15b"))


def _context() -> None:
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")


def weight_bytes(model) -> dict:
    """Bytes of ``model``'s quantized weights (int8 + float32 scales) and of its whole checkpoint, W8A16
    against float32, from parameter shapes only (works on a weightless skeleton)."""
    from mindformers_ext.quant import scale_shapes  # pylint: disable=import-outside-toplevel

    scales = scale_shapes(model)
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    quantized = sum(int(np.prod(p.shape)) for p in model.get_parameters() if p.name in scales)
    scale_count = sum(int(np.prod(s)) for s in scales.values())
    quant_bytes = quantized + 4 * scale_count
    return {"quantized_params": quantized, "linear_float32_bytes": 4 * quantized, "linear_w8a16_bytes": quant_bytes,
            "linear_ratio": round(quant_bytes / (4 * quantized), 4), "checkpoint_float32_bytes": 4 * total,
            "checkpoint_w8a16_bytes": 4 * (total - quantized) + quant_bytes,
            "checkpoint_ratio": round((4 * (total - quantized) + quant_bytes) / (4 * total), 4)}


def demo_network(w8a16: bool, kv_int8: bool):
    """The demo model with its trained weights; ``w8a16`` quantizes its weights, ``kv_int8`` caches int8."""
    # pylint: disable=import-outside-toplevel
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig

    from mindformers_ext import load_families
    load_families()  # our classes in MindFormers' registry
    from mindformers_ext.quant import quantize_model
    from mindformers_ext.runner.predict import load_weights

    config = MindFormerConfig(PREDICT_DEMO)
    config.model.model_config.use_past = True
    config.model.model_config.kv_cache_dtype = "int8" if kv_int8 else None
    config.model.model_config.checkpoint_name_or_path = ""
    network = build_network(config.model)
    load_weights(network, os.path.join(REPO, config.load_checkpoint))
    if w8a16:
        quantize_model(network)
    network.set_train(False)
    return network


def heldout_chunks(seq_length: int, count: int) -> np.ndarray:
    """``count`` chunks of ``seq_length + 1`` tokens spread over the demo's held-out files (the recipe's
    split, read from this Python's standard library)."""
    spec = importlib.util.spec_from_file_location("train_demo_model", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with open(os.path.join(DEMO_DIR, "deepseek_coder_demo.json"), encoding="utf-8") as f:
        names = json.load(f)["data"]["heldout_files"]
    root = recipe.stdlib_root()
    names = [n for n in names if os.path.isfile(os.path.join(root, n))]
    if not names:
        raise FileNotFoundError(f"none of the demo's held-out files is in this Python's standard library ({root})")
    texts = [recipe.clean_source(t) for t in (recipe.read_source(root, n) for n in names) if t is not None]
    chunks = recipe.pack_chunks(recipe.encode_documents(recipe.load_tokenizer(), texts), seq_length)
    if len(chunks) < count:
        raise ValueError(f"the held-out files give {len(chunks)} chunks of {seq_length + 1} tokens, {count} asked")
    return chunks[np.linspace(0, len(chunks) - 1, count).astype(int)]


def cached_heldout_loss(network, chunks: np.ndarray) -> float:
    """Mean next-token cross-entropy over ``chunks`` (B, S), teacher-forced through the KV cache: the
    first token prefilled, then each token decoded at its slot (the same graphs ``generate`` runs)."""
    # pylint: disable=import-outside-toplevel,protected-access
    from mindspore import Tensor

    from mindformers_ext.cache import KVCache

    batch, length = chunks.shape
    ids = chunks.astype(np.int32)
    cache = KVCache(network.cache_spec(), batch, length, network._cache_dtype())
    mask, slot = cache.prefill(np.ones((batch, 1), dtype=bool))
    out = network._step("prefill")(Tensor(ids[:, :1]), Tensor(np.zeros((batch, 1), np.int32)), mask, slot,
                                   *cache.tensors)
    losses = []
    for pos in range(1, length):
        logits = cache.take_step_output(out).asnumpy()[:, -1, :].astype(np.float64)
        peak = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
        losses.append(log_z - logits[np.arange(batch), ids[:, pos]])
        if pos == length - 1:
            break
        mask, slot = cache.next_slot()
        out = network._step("decode")(Tensor(ids[:, pos:pos + 1]), Tensor(np.full((batch, 1), pos, np.int32)),
                                      mask, slot, *cache.tensors)
    return float(np.mean(losses))


def agreement(reference: list, candidate: list) -> dict:
    """Fraction of positions where the new tokens are identical, and each row's first divergence (None: none)."""
    same = total = 0
    first = []
    for ref, cand in zip(reference, candidate):
        equal = np.asarray(ref) == np.asarray(cand)
        same += int(equal.sum())
        total += len(equal)
        first.append(int(np.argmin(equal)) if not equal.all() else None)
    return {"identical_fraction": round(same / total, 4), "new_tokens": total, "first_divergence": first}


def greedy_new_tokens(network, prompts: np.ndarray, new_tokens: int) -> list:
    """Greedy cached continuations (new tokens only) of every prompt, never stopping early."""
    out = network.generate(prompts.tolist(), max_new_tokens=new_tokens, do_sample=False, use_past=True,
                           eos_token_id=[])
    return [list(seq[prompts.shape[1]:]) for seq in out]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=("bytes", "agreement", "heldout_loss"))
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts for the greedy agreement")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=8, help="held-out chunks of 256 tokens for the loss")
    args = parser.parse_args(argv)
    _context()
    if "bytes" not in args.skip:
        from mindformers_ext.parallel import build_skeleton  # pylint: disable=import-outside-toplevel

        print(json.dumps({"result": "bytes", "model": "demo", **weight_bytes(demo_network(False, False))}),
              flush=True)
        for module, model_class, config_class, preset in PRESETS:
            package = importlib.import_module(module)
            config = getattr(package, config_class).from_preset(preset)
            model = build_skeleton(getattr(package, model_class), config)
            print(json.dumps({"result": "bytes", "model": preset, **weight_bytes(model)}), flush=True)
    networks = {name: demo_network(*flags) for name, flags in VARIANTS.items()}
    seq_length = 256
    if "agreement" not in args.skip:
        prompts = heldout_chunks(seq_length, args.prompts)[:, :args.prompt_tokens]
        new_tokens = seq_length - args.prompt_tokens
        tokens = {name: greedy_new_tokens(net, prompts, new_tokens) for name, net in networks.items()}
        for name in VARIANTS:
            if name != "float32":
                print(json.dumps({"result": "agreement", "variant": name, "prompts": args.prompts,
                                  "prompt_tokens": args.prompt_tokens,
                                  **agreement(tokens["float32"], tokens[name])}), flush=True)
    if "heldout_loss" not in args.skip:
        chunks = heldout_chunks(seq_length, args.chunks)[:, :seq_length]  # positions 0 .. 255
        losses = {name: cached_heldout_loss(net, chunks) for name, net in networks.items()}
        for name, loss in losses.items():
            print(json.dumps({"result": "heldout_loss", "variant": name, "chunks": args.chunks,
                              "tokens": int(chunks.shape[0] * (chunks.shape[1] - 1)), "loss": round(loss, 5),
                              "relative_change": round((loss - losses["float32"]) / losses["float32"], 5)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
