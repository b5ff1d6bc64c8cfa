"""Text generation from a MindFormers YAML: prompts in, completions out (CLI predict and the Python API).

The network and tokenizer come from MindFormers' registry (``model`` and ``processor.tokenizer``
sections), the weights from ``load_checkpoint`` (or ``model_config.checkpoint_name_or_path``), and
generation runs through MindFormers' ``pipeline("text_generation")``, whose forward step calls our
models' ``generate`` (KV cache on CPU included). Prompts are tokenised one by one, so a batch holds
prompts of different lengths without padding tricks; completions are decoded from the new tokens
only.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from mindspore import nn

from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerConfig

__all__ = ["Completion", "TextGenerator", "read_prompts", "resolve_checkpoint_files", "load_weights",
           "write_jsonl", "cut_at_stop", "GENERATION_KEYS", "TEXT_KEYS"]

# Keyword arguments of our models' ``generate`` that a caller may set per generator or per call.
GENERATION_KEYS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
                   "repetition_penalty", "eos_token_id", "pad_token_id", "use_past", "seed", "streamer")
# Handled here rather than by ``generate``: completions are cut before the first stop string.
TEXT_KEYS = ("stop_strings",)


@dataclass
class Completion:
    """One generated continuation: ``text`` and ``ids`` hold the new tokens only."""
    prompt: str
    text: str
    ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)

    def as_json(self) -> dict:
        """The JSON-lines record (prompt, text, ids, prompt_ids)."""
        return asdict(self)


def read_prompts(predict_data: Union[str, Sequence[str], None]) -> list[str]:
    """Prompts from ``--predict_data``: strings, or one file with one prompt per line.

    A literal ``\\n`` in a prompt becomes a newline (so one-line prompts can hold code), as in
    MindFormers' ``run_mindformer.py``. Empty lines of a file are skipped.
    """
    if predict_data is None:
        raise ValueError("predict needs --predict_data (prompt strings or a file with one prompt per line)")
    items = [predict_data] if isinstance(predict_data, str) else list(predict_data)
    if len(items) == 1 and os.path.isfile(items[0]):
        with open(items[0], encoding="utf-8") as f:
            items = [line.rstrip("\r\n") for line in f]
        items = [line for line in items if line.strip()]
        if not items:
            raise ValueError(f"{predict_data[0] if not isinstance(predict_data, str) else predict_data}: "
                             "no prompt in the file (one prompt per line)")
    return [str(item).replace("\\n", "\n") for item in items]


def resolve_checkpoint_files(path: str, rank_id: int = 0) -> list[str]:
    """The checkpoint file(s) that ``path`` (a file or a directory) stands for.

    A directory with ``rank_N`` sub-directories (MindFormers' layout) reads ``rank_<rank_id>``; a
    directory of ``.ckpt`` files gives the newest one; ``.safetensors`` shards are all returned.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    rank_dir = os.path.join(path, f"rank_{rank_id}")
    if os.path.isdir(rank_dir):
        path = rank_dir
    names = sorted(os.listdir(path))
    ckpts = [os.path.join(path, n) for n in names if n.endswith(".ckpt")]
    if ckpts:
        newest = max(ckpts, key=os.path.getmtime)
        if len(ckpts) > 1:
            logger.info("checkpoint directory %s holds %d .ckpt files: loading the newest, %s", path, len(ckpts),
                        os.path.basename(newest))
        return [newest]
    shards = [os.path.join(path, n) for n in names if n.endswith(".safetensors") and n != "hyper_param.safetensors"]
    if shards:
        return shards
    raise FileNotFoundError(f"no .ckpt or .safetensors file in checkpoint directory {path!r}")


def load_weights(network: nn.Cell, path: str, rank_id: int = 0, what: str = "load_checkpoint") -> list[str]:
    """Load a checkpoint (file or directory) into ``network``: the file (for a directory the newest
    candidate) whose weights fit every parameter; see :func:`mindformers_ext.checkpoint.load_checkpoint_into`.

    Entries that are not network parameters but training state (optimizer moments, step counters) are
    ignored. Returns the files read.
    """
    from mindformers_ext.checkpoint import load_checkpoint_into  # pylint: disable=import-outside-toplevel

    return load_checkpoint_into(network, path, rank_id, what)


def cut_at_stop(text: str, stops: Optional[Sequence[str]]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops or () if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def write_jsonl(completions: Iterable[Completion], path: str) -> str:
    """Write one JSON object per completion to ``path`` (directories created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for completion in completions:
            f.write(json.dumps(completion.as_json(), ensure_ascii=False) + "\n")
    return path


class TextGenerator:
    """Prompts to completions with the model, tokenizer and weights a YAML names.

    Args:
        config: a MindFormers config (``model`` and ``processor.tokenizer`` sections); the MindSpore
            context must be built already (see :func:`mindformers_ext.runner.context.ensure_context`).
        load_checkpoint: weights to load (file or directory); default the config's
            ``load_checkpoint`` or ``model.model_config.checkpoint_name_or_path``. A directory loads
            the newest checkpoint in it whose weights fit the model.
        random_weights: allow running without any checkpoint (randomly initialised weights; a
            warning is printed every time). Without it a missing checkpoint is an error.
        batch_size: prompts per ``generate`` call (None: all the prompts of a call at once; prompts
            of different lengths share a batch without padding waste beyond the longest).
        **gen_kwargs: defaults for ``generate`` (``max_new_tokens``, ``do_sample``, ``top_k``, ...),
            and ``stop_strings``: a row stops generating once its text holds one, and its completion
            is cut before it.
    """

    def __init__(self, config: MindFormerConfig, load_checkpoint: Optional[str] = None,
                 batch_size: Optional[int] = 1, random_weights: bool = False, **gen_kwargs: Any) -> None:
        # pylint: disable=import-outside-toplevel
        from mindformers import pipeline
        from mindformers.models.build_tokenizer import build_tokenizer
        from mindformers.models.build_model import build_network

        from mindformers_ext.checkpoint import current_rank, require_weights, weights_source

        self._check_keys(gen_kwargs)
        if config.get("model") is None or config.model.get("model_config") is None:
            raise ValueError(f"{config.get('config_path', 'config')}: no model.model_config section")
        tokenizer_cfg = (config.get("processor") or {}).get("tokenizer")
        if tokenizer_cfg is None:
            raise ValueError(f"{config.get('config_path', 'config')}: predict needs a processor.tokenizer section")
        self.batch_size = None if batch_size is None else max(1, int(batch_size))
        self.gen_kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
        source = weights_source(config, load_checkpoint)
        require_weights(source, random_weights, "predict", config.get("config_path"))
        what = "load_checkpoint" if (load_checkpoint or config.get("load_checkpoint")) else \
            "model.model_config.checkpoint_name_or_path"
        self.tokenizer = build_tokenizer(tokenizer_cfg)
        # the weights are loaded here (strictly, once): the model class must not load them again
        config.model.model_config.checkpoint_name_or_path = ""
        self.network = build_network(config.model)
        self.network.set_train(False)
        if source:
            load_weights(self.network, source, current_rank(), what)
        self.pipeline = pipeline(task="text_generation", model=self.network, tokenizer=self.tokenizer)

    @staticmethod
    def _check_keys(kwargs: dict) -> None:
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS) - set(TEXT_KEYS))
        if unknown:
            raise TypeError(f"unsupported generation arguments {unknown}; supported: "
                            f"{list(GENERATION_KEYS + TEXT_KEYS)}")

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, special tokens (BOS) included as the tokenizer adds them."""
        return [int(t) for t in self.tokenizer(prompt, add_special_tokens=True)["input_ids"]]

    def generate(self, prompts: Sequence[str], **gen_kwargs: Any) -> list[Completion]:
        """Complete every prompt; ``gen_kwargs`` override the generator's defaults for this call."""
        self._check_keys(gen_kwargs)
        options = {**self.gen_kwargs, **{k: v for k, v in gen_kwargs.items() if v is not None}}
        stops = options.pop("stop_strings", None)
        if isinstance(stops, str):
            stops = [stops]
        size = self.batch_size or max(1, len(prompts))
        results: list[Completion] = []
        for start in range(0, len(prompts), size):
            batch = list(prompts[start:start + size])
            ids = [self.encode(p) for p in batch]
            early_stop = {"stop_strings": stops, "tokenizer": self.tokenizer} if stops else {}
            output = self.pipeline.forward({"input_ids": ids}, return_dict_in_generate=True, **options,
                                           **early_stop)
            sequences = output["sequences"] if isinstance(output, dict) else output.sequences
            for prompt, prompt_ids, sequence in zip(batch, ids, sequences):
                new = [int(t) for t in np.asarray(sequence).reshape(-1)[len(prompt_ids):]]
                text, _ = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stops)
                results.append(Completion(prompt, text, new, prompt_ids))
        return results

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        """Completions (new text only) of ``prompts``."""
        return [c.text for c in self.generate(prompts)]
