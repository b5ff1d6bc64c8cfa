"""train / finetune / eval through MindFormers' ``Trainer``."""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Optional

from mindspore.train.callback import Callback
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerConfig

__all__ = ["run_train", "run_eval", "DataError", "check_record_lengths", "dataset_files", "LoadWeightsAtTrainBegin",
           "install_portable_barrier"]

# records read per data file by the start-up length check (preprocessors write one fixed length)
RECORDS_CHECKED = 1024


class DataError(ValueError):
    """Training data that does not fit the config; the message names the data file and the key."""


def dataset_files(dataset: Optional[dict]) -> list[str]:
    """The MindRecord files a dataset section reads (``data_loader.dataset_dir``: a file or a directory
    of ``*.mindrecord`` files, or ``data_loader.dataset_files``)."""
    loader = (dataset or {}).get("data_loader") or {}
    files = loader.get("dataset_files")
    if files:
        return [files] if isinstance(files, str) else list(files)
    path = loader.get("dataset_dir")
    if not path:
        return []
    if os.path.isdir(path):
        return sorted(f for f in glob.glob(os.path.join(path, "*"))
                      if os.path.isfile(f) and re.search(r"\.mindrecord\d*$", f))
    return [path]


def check_record_lengths(config: MindFormerConfig, section: str = "train_dataset") -> None:
    """Refuse data whose records are longer than ``seq_length + 1`` tokens (the model would silently
    train on the longer sequences): checks the first records of every file of ``section``."""
    model_config = (config.get("model") or {}).get("model_config") or {}
    seq_length = model_config.get("seq_length")
    dataset = config.get(section)
    if not seq_length or not isinstance(dataset, dict):
        return
    from mindspore.mindrecord import FileReader  # pylint: disable=import-outside-toplevel

    columns = [c for c in (dataset.get("input_columns") or ["input_ids"]) if c in ("input_ids", "labels")]
    for file in dataset_files(dataset):
        if not os.path.isfile(file):
            raise DataError(f"{section}.data_loader.dataset_dir: data file {file} does not exist")
        try:
            reader = FileReader(file, num_consumer=1, columns=columns or None)
        except Exception as exc:  # pylint: disable=broad-except
            raise DataError(f"{file}: cannot read it as MindRecord ({section}): {exc}") from exc
        try:
            for i, row in enumerate(reader.get_next()):
                if i >= RECORDS_CHECKED:
                    break
                for column in columns or list(row):
                    length = int(getattr(row.get(column), "size", 0) or 0)
                    if length > seq_length + 1:
                        raise DataError(
                            f"{file}: record {i} has {length} tokens in {column!r} but model.model_config.seq_length "
                            f"is {seq_length}, so records may hold at most seq_length + 1 = {seq_length + 1} tokens; "
                            f"preprocess the data with --seq_length {seq_length}, or set "
                            f"--model.model_config.seq_length {length - 1}")
        finally:
            reader.close()


def _find_model(cell):
    """The model inside a training wrapper (the first MindFormers PreTrainedModel), else ``cell``."""
    from mindformers.models.modeling_utils import PreTrainedModel  # pylint: disable=import-outside-toplevel

    for _, sub in cell.cells_and_names():
        if isinstance(sub, PreTrainedModel):
            return sub
    return cell


class LoadWeightsAtTrainBegin(Callback):
    """Loads ``load_checkpoint`` into the model when training begins, before the first step.

    Used where every rank holds the whole model (one process, or data parallel): each rank loads the
    full checkpoint itself (strictly, see :mod:`mindformers_ext.checkpoint`), so MindFormers' load path,
    with its Ascend-only collectives (``Barrier``) and resharding, is not needed.
    """

    def __init__(self, source: str, rank_id: Optional[int] = None) -> None:
        super().__init__()
        self.source, self.rank_id = source, rank_id
        self.files: list[str] = []

    def on_train_begin(self, run_context) -> None:
        # pylint: disable=import-outside-toplevel
        from mindformers_ext.checkpoint import load_checkpoint_into

        args = run_context.original_args()
        network = _find_model(args.train_network)
        self.files = load_checkpoint_into(network, self.source, self.rank_id, "load_checkpoint")
        logger.info("load_checkpoint: %s loaded into %s on this rank before the first step", ", ".join(self.files),
                    type(network).__name__)


def _portable_barrier():
    """A barrier over all ranks that exists on CPU (MindSpore's ``Barrier`` op does not)."""
    from mindspore import mint  # pylint: disable=import-outside-toplevel

    mint.distributed.barrier()


class _PortableCommFunc:
    """``mindspore.communication.comm_func`` with a ``barrier`` that runs on CPU."""

    def __init__(self, real) -> None:
        self._real = real
        self.barrier = _portable_barrier

    def __getattr__(self, name):
        return getattr(self._real, name)


# MindFormers modules that call comm_func.barrier (directly, or through utils.parallel_utils.barrier_world)
_BARRIER_MODULES = ("mindformers.utils.parallel_utils", "mindformers.trainer.utils",
                    "mindformers.utils.load_checkpoint_utils", "mindformers.core.callback.callback",
                    "mindformers.models.modeling_utils", "mindformers.checkpoint.checkpoint",
                    "mindformers.tools.resume_ckpt", "mindformers.tools.ckpt_transform.transform_checkpoint")


def install_portable_barrier() -> list[str]:
    """On CPU, point MindFormers' checkpoint code at a barrier that runs there.

    MindFormers' load / resume / save paths call ``mindspore.communication.comm_func.barrier`` (the
    ``Barrier`` op: "Unsupported op [Barrier] on CPU"), imported by name or through
    ``utils.parallel_utils.barrier_world``; ``mint.distributed.barrier`` synchronises the ranks on CPU
    too. Returns the patched modules.
    """
    # pylint: disable=import-outside-toplevel
    import importlib

    import mindspore as ms
    from mindspore.communication import comm_func

    if ms.get_context("device_target") != "CPU":
        return []
    patched = []
    for name in _BARRIER_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # pylint: disable=broad-except
            continue
        if getattr(module, "barrier", None) is comm_func.barrier:
            module.barrier = _portable_barrier
            patched.append(name)
        if getattr(module, "comm_func", None) is comm_func:
            module.comm_func = _PortableCommFunc(comm_func)
            patched.append(name)
    return patched


def run_train(config: MindFormerConfig) -> Any:
    """Train or finetune as the YAML says (the MindSpore context must be built).

    Both run modes go through ``Trainer.train()``, which, unlike ``Trainer.finetune()``, honours
    ``resume_training`` (weights, optimizer state, step and loss scale from the checkpoint; the
    dataset skips the steps already done). Initial weights (``load_checkpoint`` without
    ``resume_training``) where every rank holds the whole model (one process, or data parallel, which
    is all CPU runs) are loaded by :class:`LoadWeightsAtTrainBegin`: the newest file that fits the
    model, every parameter checked; MindFormers loads them otherwise (semi-auto parallel on Ascend).
    """
    # pylint: disable=import-outside-toplevel
    from mindformers import Trainer

    from mindformers_ext.checkpoint import current_rank
    from mindformers_ext.runner.config import full_copy_layout

    check_record_lengths(config, "train_dataset")
    callbacks = []
    source = config.get("load_checkpoint")
    if config.get("use_parallel"):
        install_portable_barrier()
    if config.get("resume_training"):
        logger.info("resuming from %s", source)
    elif source and full_copy_layout(config):
        callbacks.append(LoadWeightsAtTrainBegin(source, current_rank()))
        config.load_checkpoint = ""  # MindFormers must not load (or preload, or reshard) it as well
        config.auto_trans_ckpt = False
    trainer = Trainer(config, callbacks=callbacks or None)
    return trainer.train()


def run_eval(config: MindFormerConfig) -> dict:
    """Mean token loss and perplexity of ``load_checkpoint`` on ``eval_dataset``.

    MindFormers' ``Trainer.evaluate`` feeds ``PerplexityMetric`` with the (logits, tokens, mask)
    triple that its own Llama returns in eval mode; our models return logits only. So the loss is
    computed here with the model's training-mode forward (the same shifted, -100-masked
    cross-entropy as in training; our models have no dropout), averaged over batches as
    ``PerplexityMetric`` does. Written to ``output_dir/eval_results.json`` and returned.
    """
    # pylint: disable=import-outside-toplevel
    from mindformers.dataset import build_dataset
    from mindformers.models.build_model import build_network

    from mindformers_ext.runner.predict import load_weights

    path = config.get("config_path", "config")
    if config.get("eval_dataset_task") is None or config.get("eval_dataset") is None:
        raise ValueError(f"{path}: run_mode eval needs eval_dataset and eval_dataset_task sections")
    loader = config.eval_dataset.data_loader
    if not (loader.get("dataset_dir") or loader.get("dataset_files")):
        raise ValueError(f"{path}: eval_dataset.data_loader.dataset_dir is empty (pass --eval_dataset_dir)")
    if not config.get("load_checkpoint"):
        raise ValueError("run_mode eval needs --load_checkpoint")
    check_record_lengths(config, "eval_dataset")
    # the YAML anchor (dataset_config: *eval_dataset) is a copy once loaded, as MindFormers' trainer knows
    config.eval_dataset_task.dataset_config = config.eval_dataset
    dataset = build_dataset(config.eval_dataset_task)
    network = build_network(config.model)
    load_weights(network, config.load_checkpoint, int(config.get("rank_id") or 0))
    network.set_train(True)  # the loss path of construct; no gradients are taken
    losses = [float(network(*batch).asnumpy()) for batch in dataset.create_tuple_iterator()]
    if not losses:
        raise ValueError(f"{path}: the eval dataset gave no batch")
    loss = sum(losses) / len(losses)
    result = {"loss": loss, "PPL": math.exp(loss), "batches": len(losses)}
    out = os.path.join(config.get("output_dir") or "./output", "eval_results.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    logger.info("eval: %s (written to %s)", result, out)
    print(result)
    return result
