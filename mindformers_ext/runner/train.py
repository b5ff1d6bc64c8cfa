"""train / finetune / eval through MindFormers' ``Trainer``."""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Optional

from mindspore.train.callback import Callback
from mindformers.core.callback.callback import CheckpointMonitor
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

__all__ = ["run_train", "run_eval", "DataError", "check_record_lengths", "dataset_files", "LoadWeightsAtTrainBegin",
           "MoEDropMonitor", "loss_without_training_behaviour", "install_portable_barrier", "StepCheckpointMonitor",
           "run_checkpoints", "choose_resume_checkpoint"]

# records read per data file by the start-up length check (preprocessors write one fixed length)
RECORDS_CHECKED = 1024
# the step a checkpoint file name carries: ``<prefix>-<epoch>_<step>.<format>``
_CKPT_STEP = re.compile(r"-(\d+)_(\d+)\.[a-z]+$")


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


class MoEDropMonitor(Callback):
    """Logs, every ``interval`` steps, how many token-expert assignments the capacity-limited MoE layers
    dropped (``capacity_factor``, see research/deepseek2/deepseek2.py) out of all they routed."""

    def __init__(self, interval: int = 1) -> None:
        super().__init__()
        self.interval = max(1, int(interval))
        self.since = 1

    def on_train_step_end(self, run_context) -> None:
        from mindformers_ext.counters import MOE_DROPPED, take  # pylint: disable=import-outside-toplevel

        step = run_context.original_args().cur_step_num
        if step % self.interval:
            return
        counts = take(MOE_DROPPED)
        if counts.size and counts[1]:
            logger.info("MoE capacity_factor: dropped %d of %d routed token-expert assignments (%.2f%%) in steps "
                        "%d-%d", counts[0], counts[1], 100.0 * counts[0] / counts[1], self.since, step)
        self.since = step + 1


def _loss_print_interval(config: MindFormerConfig) -> int:
    """``per_print_times`` of the YAML's MFLossMonitor callback (1 without one)."""
    for callback in config.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("type") == "MFLossMonitor":
            return int(callback.get("per_print_times") or 1)
    return 1


def _newest_first(paths: list[str]) -> list[str]:
    """Most recently written first; files of the same time by the step in their names."""
    def key(path: str) -> tuple:
        match = _CKPT_STEP.search(path)
        return os.path.getmtime(path), int(match.group(2)) if match else -1

    return sorted(paths, key=key, reverse=True)


def run_checkpoints(directory: str, prefix: str, fmt: str = "ckpt") -> list[str]:
    """The checkpoint files that runs with ``prefix`` wrote in ``directory``, newest first: ``<prefix>-E_S.<fmt>``,
    and ``<prefix>_N-E_S.<fmt>``, the names under which MindSpore wrote resumed runs before
    :class:`StepCheckpointMonitor`."""
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(re.escape(prefix) + r"(_\d+)?-\d+_\d+\." + re.escape(fmt) + "$")
    return _newest_first([os.path.join(directory, n) for n in os.listdir(directory) if pattern.match(n)])


class StepCheckpointMonitor(CheckpointMonitor):
    """MindFormers' ``CheckpointMonitor`` with names, rotation and meta.json that hold across resumes.

    ``run_train`` builds it for the YAML's ``type: CheckpointMonitor`` (MindFormers' trainer recognises the
    callback by that name). Unlike upstream, after a resume:

    * a file is named ``<prefix>_rank_<rank>-<epoch>_<global step>.<format>``, the step it holds (upstream
      names the step within the epoch counted from the resumed step: its ``-1_40`` held step 90; and it
      renamed the prefix of every new run, ``..._rank_0_1-...``, when files of the prefix existed);
    * ``keep_checkpoint_max`` counts every file of the prefix in the directory, those of earlier runs
      too, and removes the least recently written (upstream counted only the current run's);
    * checkpoints are written every ``save_checkpoint_steps`` global steps (upstream counted from the
      resumed step), so an interrupted and resumed run writes the files an uninterrupted one writes;
    * meta.json's ``last_step`` is the global step of its ``last_ckpt_file``.
    """

    def __init__(self, prefix: str = "CKP", *args: Any, **kwargs: Any) -> None:
        super().__init__(prefix, *args, **kwargs)
        self._prefix = f"{prefix}_rank_{self.rank_id}"  # undo ModelCheckpoint's per-run renaming
        self._written: Optional[tuple[int, int, str]] = None  # (epoch, global step, name) being written

    def _global_step(self, cb_params: Any) -> int:
        return int(self._append_step_num + cb_params.cur_step_num)

    def _check_save_ckpt(self, cb_params: Any, force_to_save: bool) -> bool:
        every = self._config.save_checkpoint_steps
        if force_to_save or not every or every <= 0:
            return super()._check_save_ckpt(cb_params, force_to_save)
        last = self._append_step_num + self._last_triggered_step
        return self._global_step(cb_params) // every > last // every

    def save_checkpoint(self, cb_params: Any) -> None:
        step = self._global_step(cb_params)
        name = f"{self._prefix}-{cb_params.cur_epoch_num}_{step}.{self._config.format}"
        self._written = (int(cb_params.cur_epoch_num), step, name)
        keep = self._config.keep_checkpoint_max
        if keep and keep > 0:
            target = os.path.join(self._directory, name)
            older = [f for f in run_checkpoints(self._directory, self._prefix, self._config.format) if f != target]
            for stale in ([target] if os.path.exists(target) else []) + older[keep - 1:]:
                os.remove(stale)
                logger.info("keep_checkpoint_max %d: removed %s", keep, stale)
        super().save_checkpoint(cb_params)
        path = os.path.join(self._directory, name)
        self._latest_ckpt_file_name = path
        self.save_info_list[cb_params.cur_step_num]["ckpt"]["ckpt_file_path"] = path

    def remove_redundancy(self, network: Any, cur_file: str, append_dict: dict, train_network: Any) -> None:
        # save_checkpoint writes the resume checkpoint through here (train_network None; the network-only
        # and trainable-only copies pass theirs): under its global-step name
        if train_network is None and self._written is not None:
            cur_file = os.path.join(self._directory, self._written[2])
        super().remove_redundancy(network, cur_file, append_dict, train_network)

    def record_last_ckpt_to_json(self, epoch: int, step: int, ckpt_file: str) -> None:
        if self._written is not None:
            epoch, step, ckpt_file = self._written
        super().record_last_ckpt_to_json(epoch, step, ckpt_file)


def choose_resume_checkpoint(path: str, rank_id: int = 0, fmt: str = "ckpt") -> tuple[str, list[tuple[str, str]]]:
    """The checkpoint to resume from in directory ``path`` (its ``rank_<rank>`` folder if there is one):
    the most recently written ``.<fmt>`` file that reads as a whole and holds a ``step_num``. Returns it
    and the newer files skipped, each with the reason; :class:`CheckpointError` when none qualifies."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.checkpoint import CheckpointError, checkpoint_index

    folder = os.path.join(path, f"rank_{rank_id}")
    folder = folder if os.path.isdir(folder) else path
    files = _newest_first([os.path.join(folder, n) for n in os.listdir(folder)
                           if n.endswith(f".{fmt}") and n != "hyper_param.safetensors"
                           and os.path.isfile(os.path.join(folder, n))])
    skipped = []
    for file in files:
        try:
            index = checkpoint_index(file)
        except CheckpointError as exc:
            skipped.append((file, str(exc)))
            continue
        if "step_num" not in index:
            skipped.append((file, "no step_num in it: not a checkpoint written by training"))
            continue
        return file, skipped
    reasons = "".join(f"\n  {file}: {why}" for file, why in skipped)
    raise CheckpointError(f"resume_training: no .{fmt} checkpoint in {folder} can be resumed from{reasons}")


def _resume_from_newest_good(config: MindFormerConfig, rank_id: int) -> None:
    """Point a ``resume_training: True`` run whose ``load_checkpoint`` is a directory at the checkpoint
    :func:`choose_resume_checkpoint` picks, warning about each newer one it skipped (a file, or a file
    name in ``resume_training``, is taken as given)."""
    source = config.get("load_checkpoint")
    if config.get("resume_training") is not True or not source or not os.path.isdir(source):
        logger.info("resume_training: resuming from %s", os.path.join(source or "", str(config.resume_training))
                    if isinstance(config.get("resume_training"), str) else source)
        return
    chosen, skipped = choose_resume_checkpoint(source, rank_id, config.get("load_ckpt_format") or "ckpt")
    for file, why in skipped:
        logger.warning("resume_training: skipped %s, which does not load: %s", file, why)
    name = os.path.basename(chosen)
    if os.path.dirname(chosen) == os.path.join(source, f"rank_{rank_id}") and f"_rank_{rank_id}" in name:
        config.resume_training = name  # MindFormers' own way to name the file: <load_checkpoint>/rank_<rank>/<name>
    else:
        config.load_checkpoint = chosen
    logger.info("resume_training: resuming from %s", chosen)


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
    dataset skips the steps already done; from a directory, the newest checkpoint that loads, see
    :func:`choose_resume_checkpoint`); :class:`StepCheckpointMonitor` writes the checkpoints. Initial
    weights (``load_checkpoint`` without ``resume_training``) where every rank holds the whole model
    (one process, or data parallel, which is all CPU runs) are loaded by :class:`LoadWeightsAtTrainBegin`:
    the newest file that fits the model, every parameter checked; MindFormers loads them otherwise
    (semi-auto parallel on Ascend).
    """
    # pylint: disable=import-outside-toplevel
    from mindformers import Trainer

    from mindformers_ext.checkpoint import current_rank
    from mindformers_ext.runner.config import full_copy_layout

    check_record_lengths(config, "train_dataset")
    callbacks: list = [MoEDropMonitor(_loss_print_interval(config))]
    source = config.get("load_checkpoint")
    if config.get("use_parallel"):
        install_portable_barrier()
    if config.get("resume_training"):
        _resume_from_newest_good(config, current_rank())
    elif source and full_copy_layout(config):
        callbacks.append(LoadWeightsAtTrainBegin(source, current_rank()))
        config.load_checkpoint = ""  # MindFormers must not load (or preload, or reshard) it as well
        config.auto_trans_ckpt = False
    registry = MindFormerRegister.registry[MindFormerModuleType.CALLBACK]
    upstream = registry["CheckpointMonitor"]
    registry["CheckpointMonitor"] = StepCheckpointMonitor
    try:
        trainer = Trainer(config, callbacks=callbacks)
        return trainer.train()
    finally:
        registry["CheckpointMonitor"] = upstream


def loss_without_training_behaviour(network) -> None:
    """Put a causal LM in the mode evaluation reads its loss in: the training-mode ``construct`` (the
    shifted, -100-masked cross-entropy) over a decoder stack in inference mode, so that nothing only
    training does enters the loss: no MoE balance loss is added and no capacity_factor drops tokens."""
    network.set_train(True)
    network.model.set_train(False)


def run_eval(config: MindFormerConfig) -> dict:
    """Mean token loss and perplexity of ``load_checkpoint`` on ``eval_dataset``.

    MindFormers' ``Trainer.evaluate`` feeds ``PerplexityMetric`` with the (logits, tokens, mask)
    triple that its own Llama returns in eval mode; our models return logits only. So the loss is
    computed here with the model's training-mode forward over layers in inference mode (the same
    shifted, -100-masked cross-entropy as in training, without the MoE balance loss or capacity
    drops; our models have no dropout), averaged over batches as ``PerplexityMetric`` does. Written
    to ``output_dir/eval_results.json`` and returned.
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
    loss_without_training_behaviour(network)
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
