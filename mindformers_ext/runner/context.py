"""MindSpore / MindFormers context set-up for a run (build it once, before anything asks for it)."""
from __future__ import annotations

import gc
import os

from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerConfig

__all__ = ["ensure_context", "freeze_gc_heap"]


def ensure_context(config: MindFormerConfig) -> None:
    """Point MindFormers' outputs at ``config.output_dir`` and build the context from ``config``.

    MindFormers' context is a process-wide singleton: ``mindformers.get_context`` before
    ``build_context`` creates a default one (PYNATIVE, device "Ascend"), so this must run first.
    When a context already exists (a second run in one process, or a caller that built it), it is
    kept and only a differing device target is reported.
    """
    # pylint: disable=import-outside-toplevel
    from mindformers.core.context.build_context import Context, build_context
    from mindformers.utils.file_utils import set_output_path
    import mindspore as ms

    set_output_path(os.path.abspath(config.get("output_dir") or "./output"))
    # MindFormers' build_context exports RUN_MODE for predict and eval, and its Trainer skips the global
    # batch size set-up when RUN_MODE is "predict", then fails at the first logged step: a value inherited
    # from the environment (an inference script's export, an earlier predict in this process) must not
    # decide how this run trains.
    mode = config.get("run_mode")
    if mode and os.environ.get("RUN_MODE", mode) != mode:
        logger.warning("RUN_MODE=%s in the environment; this run's mode is %s", os.environ["RUN_MODE"], mode)
        os.environ["RUN_MODE"] = mode
    if config.get("seed") is not None:  # Trainer sets it too; predict relies on this one
        ms.set_seed(int(config.seed))
    if Context.is_exists():
        current = ms.get_context("device_target")
        wanted = config.context.get("device_target")
        if wanted and current and wanted != current:
            logger.warning("the MindSpore context already targets %s; ignoring context.device_target %s",
                           current, wanted)
        return
    build_context(config)


def freeze_gc_heap() -> None:
    """Collect, then put every object alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    MindSpore runs a full ``gc.collect()`` before it compiles each graph. With MindSpore and MindFormers
    imported that walks about 580k objects (with torch and transformers too): 0.25 s per graph on one
    CPU core, about a sixth of compiling a small model's graph. After this call those collections walk
    only the objects made since. Frozen objects are never freed as cycles, so call it once the process's
    long-lived objects (modules, the model) exist: before the first graph compiles.
    """
    gc.collect()
    gc.freeze()
