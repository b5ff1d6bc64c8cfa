"""Export WizardCoder's incremental-inference graphs to MindIR: prefill and one-token decode.

    python research/wizardcoder/export_wizardcoder_inc.py --config research/wizardcoder/run_wizardcoder.yaml \
        --load_checkpoint ckpt/wizardcoder_15b.ckpt --output_dir wizardcoder-15b_mslite_inc
    python research/wizardcoder/export_wizardcoder_inc.py --hf_dir WizardCoder-15B-V1.0 --output_dir out_inc

Writes ``prefill.mindir``, ``decode.mindir`` and ``wizardcoder_inc.json`` (what a runner needs: the
cache layout (:class:`mindformers_ext.cache.CacheSpec`), end / pad ids, the position limit). Both
graphs have dynamic batch and length dimensions (one file serves every prompt length and cache
capacity), so the seed's ``--batch_size`` / ``--seq_length`` are accepted but not needed. The graphs
are exactly the ones ``generate`` compiles (:class:`mindformers_ext.generation.step_cells.CachedStep`):
``(input_ids (B, S), position_ids (B, S), mask, slot (B,), n caches (B, kv_heads, T, head_dim))`` ->
last-position logits (B, 1, vocab) and the updated caches (the new tokens written at ``slot``);
kv_heads = 1 for multi-query. Prefill writes the prompt into a zero cache at slot 0 (mask
(B, 1, S, S)); decode adds one token per row (S = 1, mask (B, 1, 1, T)).

Batches are left-padded, position ids count real tokens only and masks are additive (0 / -1e9), as in
``mindformers_ext.generation.decoding``. :class:`MindIRGenerator` runs the exported files
(``mindspore.load`` + ``nn.GraphCell``) with that same decoding loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PREFILL, DECODE, META = "prefill.mindir", "decode.mindir", "wizardcoder_inc.json"

if REPO not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, REPO)
os.environ.setdefault("LOG_MF_PATH", os.path.join(os.path.abspath("./output"), "log"))

# pylint: disable=wrong-import-position
import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from mindformers_ext.cache import CacheSpec  # noqa: E402
from mindformers_ext.generation.decoding import DecodingMixin  # noqa: E402
from mindformers_ext.generation.step_cells import CachedStep, cached_step_inputs  # noqa: E402
from mindformers_ext.layers.linear import ms_dtype  # noqa: E402


def export_incremental(model: nn.Cell, output_dir: str) -> dict[str, str]:
    """Export ``model``'s prefill and decode graphs (dynamic shapes) to ``output_dir``; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    model.set_train(False)
    config = model.config
    spec = model.cache_spec()
    cache_dtype = ms_dtype(config.compute_dtype)
    for name, decode in ((PREFILL, False), (DECODE, True)):
        step = CachedStep(model, spec, cache_dtype, decode, cpu_kernels=False)  # portable: stock operators
        step.set_train(False)
        step.prepare()  # ms.export compiles without Cell.__call__: the model's cells take cpu_kernels=False
        ms.export(step, *cached_step_inputs(spec, cache_dtype),
                  file_name=os.path.join(output_dir, name[:-len(".mindir")]), file_format="MINDIR")
    meta = {
        "cache_spec": spec.to_dict(), "vocab_size": int(config.vocab_size),
        "compute_dtype": config.compute_dtype, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "max_position_embedding": int(config.max_position_embedding),
        "max_decode_length": int(getattr(config, "max_decode_length", 1024)),
    }
    with open(os.path.join(output_dir, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return {"prefill": os.path.join(output_dir, PREFILL), "decode": os.path.join(output_dir, DECODE),
            "meta": os.path.join(output_dir, META)}


class _MetaConfig:
    """The fields of a model config that ``DecodingMixin.generate`` reads."""

    def __init__(self, meta: dict) -> None:
        self.eos_token_id = meta["eos_token_id"]
        self.pad_token_id = meta["pad_token_id"]
        self.max_position_embedding = meta["max_position_embedding"]
        self.max_decode_length = meta["max_decode_length"]
        self.compute_dtype = meta["compute_dtype"]
        self.use_past = True
        self.do_sample = False
        self.top_k = 0
        self.top_p = 1.0
        self.repetition_penalty = 1.0

    def context_length(self) -> int:
        return self.max_position_embedding


class MindIRGenerator(DecodingMixin):
    """``generate`` over exported MindIR graphs (``mindspore.load`` + ``nn.GraphCell``), with the same
    decoding loop as the model's own ``generate`` (KV cache always on)."""

    def __init__(self, export_dir: str) -> None:
        meta_path = os.path.join(export_dir, META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{export_dir}: no {META}; export with export_wizardcoder_inc.py first")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        self.config = _MetaConfig(self.meta)
        self.training = False
        self._step_cells = {
            "prefill": nn.GraphCell(ms.load(os.path.join(export_dir, PREFILL))),
            "decode": nn.GraphCell(ms.load(os.path.join(export_dir, DECODE))),
        }

    def cache_spec(self) -> CacheSpec:
        """The exported model's cache layout (from the export's metadata)."""
        return CacheSpec.from_dict(self.meta["cache_spec"])

    def set_train(self, mode: bool = True) -> "MindIRGenerator":
        """Graphs are inference-only; kept for ``generate``'s bookkeeping."""
        self.training = False
        del mode
        return self

    def generate(self, input_ids: Any, generation_config: Any = None, logits_processor: Any = None,
                 streamer: Any = None, seed: Optional[int] = None, **kwargs):
        if kwargs.get("use_past") is False:
            raise ValueError("the exported graphs are the cached (incremental) path: use_past must stay True")
        kwargs["use_past"] = True
        return super().generate(input_ids, generation_config, logits_processor, streamer, seed, **kwargs)


def build_model(config_path: Optional[str] = None, load_checkpoint: Optional[str] = None,
                hf_dir: Optional[str] = None, overrides: Optional[dict] = None, random_weights: bool = False):
    """The model to export: from an HF directory, or from a YAML (+ checkpoint) as run_mindformer builds it.

    The weights come from ``load_checkpoint``, else the YAML's ``load_checkpoint`` or
    ``model.model_config.checkpoint_name_or_path`` (checked to fit the model); with none of them the
    export is refused (:class:`mindformers_ext.checkpoint.CheckpointError`) unless ``random_weights``.
    """
    if hf_dir:
        from mindformers_ext import load_hf_model  # pylint: disable=import-outside-toplevel

        ms.set_context(mode=ms.GRAPH_MODE)
        return load_hf_model(hf_dir, use_past=True, **(overrides or {}))
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.families import load_families
    load_families()  # the research packages' classes in MindFormers' registry
    from mindformers.models.build_model import build_network
    from mindformers_ext.runner.config import adapt_to_device, build_config
    from mindformers_ext.runner.context import ensure_context
    from mindformers_ext.checkpoint import require_weights, weights_source
    from mindformers_ext.runner.predict import load_weights

    args = argparse.Namespace(config=config_path, run_mode="predict", load_checkpoint=load_checkpoint,
                              device_target=None, use_past=True)
    dotted = {f"model.model_config.{k}": v for k, v in (overrides or {}).items()}
    config = build_config(args, dotted)
    adapt_to_device(config)  # moves model_config.checkpoint_name_or_path to load_checkpoint
    ensure_context(config)
    source = weights_source(config, load_checkpoint)
    require_weights(source, random_weights, "export_wizardcoder_inc.py", config.get("config_path"))
    config.model.model_config.checkpoint_name_or_path = ""  # loaded (once, checked) below
    network = build_network(config.model)
    if source:
        load_weights(network, source)
    network.set_train(False)
    return network


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(HERE, "run_wizardcoder.yaml"),
                        help="YAML with the model (default: run_wizardcoder.yaml)")
    parser.add_argument("--load_checkpoint", "--model_path", dest="load_checkpoint", default=None,
                        help="MindSpore checkpoint (file or directory) for the YAML's model")
    parser.add_argument("--hf_dir", default=None, help="export an HF GPT-BigCode directory instead of --config")
    parser.add_argument("--random_weights", action="store_true",
                        help="export without a checkpoint (randomly initialised weights, with a warning); without "
                             "it, no --load_checkpoint / checkpoint_name_or_path is an error")
    parser.add_argument("--output_dir", default="wizardcoder_mslite_inc")
    parser.add_argument("--compute_dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="override the YAML's compute / parameter dtype (bfloat16 does not run on CPU)")
    parser.add_argument("--batch_size", type=int, default=None, help="seed flag; the graphs take any batch")
    parser.add_argument("--seq_length", type=int, default=None, help="seed flag; the graphs take any length")
    parser.add_argument("--device_id", type=int, default=None, help="seed flag (the YAML's context decides)")
    args = parser.parse_args(argv)
    overrides = {}
    if args.compute_dtype:
        overrides.update(compute_dtype=args.compute_dtype, param_init_type=args.compute_dtype)
    if args.hf_dir and args.compute_dtype:
        overrides = {"dtype": args.compute_dtype}
    from mindformers_ext.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel

    try:
        model = build_model(args.config, args.load_checkpoint, args.hf_dir, overrides, args.random_weights)
    except CheckpointError as exc:
        print(f"export_wizardcoder_inc.py: error: {exc}", file=sys.stderr)
        return 2
    paths = export_incremental(model, args.output_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
