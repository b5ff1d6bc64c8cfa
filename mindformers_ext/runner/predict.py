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
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

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
    error: Optional[str] = None  # why this prompt got no completion (the others still ran)

    def as_json(self) -> dict:
        """The JSON-lines record (prompt, text, ids, prompt_ids, and ``error`` for a failed prompt)."""
        record = asdict(self)
        if record["error"] is None:
            del record["error"]
        record["prompt"] = printable(record["prompt"])
        return record


def printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes of non-UTF-8 input) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_error(text: str) -> Optional[str]:
    """Where ``text`` (from argv or a file, with surrogate escapes) is not valid UTF-8; None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start:exc.end].encode("utf-8", "surrogateescape")
        line = text.count("\n", 0, exc.start) + 1
        column = exc.start - (text.rfind("\n", 0, exc.start) + 1) + 1
        return f"not valid UTF-8: byte 0x{raw[0]:02x} at line {line}, column {column}"
    return None


def read_prompts(predict_data: Union[str, Sequence[str], None]) -> list[str]:
    """Prompts from ``--predict_data``: strings, or one file with one prompt per line.

    A literal ``\\n`` in a prompt becomes a newline (so one-line prompts can hold code), as in
    MindFormers' ``run_mindformer.py``. Empty lines of a file are skipped.
    A line (or argument) that is not valid UTF-8 is kept with surrogate escapes; :meth:`TextGenerator.
    complete` reports it as that prompt's error (see :func:`utf8_error`).
    """
    if predict_data is None:
        raise ValueError("predict needs --predict_data (prompt strings or a file with one prompt per line)")
    items = [predict_data] if isinstance(predict_data, str) else list(predict_data)
    if len(items) == 1 and os.path.isfile(items[0]):
        # bytes, decoded line by line: one bad line must not lose the others
        with open(items[0], "rb") as f:
            items = [line.rstrip(b"\r\n").decode("utf-8", "surrogateescape") for line in f]
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
    """Write one JSON object per completion to ``path`` (directories created); returns the path.

    Atomic: the lines go to ``path.tmp-<pid>`` (flushed one by one, so a lazy ``completions`` keeps
    what it produced), which replaces ``path`` at the end, also when ``completions`` raises midway; a
    run that writes nothing leaves no ``path`` (an older run's results are removed, never shown as
    this run's).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            try:
                for completion in completions:
                    f.write(json.dumps(completion.as_json(), ensure_ascii=False) + "\n")
                    f.flush()
                    written += 1
            finally:
                f.close()
                if written:
                    os.replace(tmp, path)
                elif os.path.lexists(path):
                    os.remove(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
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
        quant: ``"w8a16"``: int8 weights for the linear layers (``run_mindformer.py --quant w8a16``): a
            checkpoint written by ``convert_weight.py --quant w8a16`` loads as it is, a float one is
            quantized after loading (:func:`mindformers_ext.quant.load_checkpoint_w8a16`).
        batch_size: prompts per ``generate`` call (None: all the prompts of a call at once; prompts
            of different lengths share a batch without padding waste beyond the longest).
        **gen_kwargs: defaults for ``generate`` (``max_new_tokens``, ``do_sample``, ``top_k``, ...),
            and ``stop_strings``: a row stops generating once its text holds one, and its completion
            is cut before it.
    """

    def __init__(self, config: MindFormerConfig, load_checkpoint: Optional[str] = None,
                 batch_size: Optional[int] = 1, random_weights: bool = False, quant: Optional[str] = None,
                 **gen_kwargs: Any) -> None:
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
        if quant:
            from mindformers_ext.quant import check_method, load_checkpoint_w8a16, quantize_model

            check_method(quant)
            if source:
                load_checkpoint_w8a16(self.network, source, current_rank(), what, quant)
            else:
                quantize_model(self.network, quant)
        elif source:
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
        """Complete every prompt; ``gen_kwargs`` override the generator's defaults for this call.

        A bad prompt (not UTF-8, longer than the model's context) raises ``ValueError``; see
        :meth:`complete` to keep going past it."""
        return list(self._run(prompts, False, gen_kwargs))

    def complete(self, prompts: Sequence[str], **gen_kwargs: Any) -> Iterator[Completion]:
        """Like :meth:`generate`, lazily and fault-tolerant: a prompt that fails (not UTF-8, too long for
        the context, ...) yields a :class:`Completion` with ``error`` set, and the others still run."""
        return self._run(prompts, True, gen_kwargs)

    def _run(self, prompts: Sequence[str], keep_going: bool, gen_kwargs: dict) -> Iterator[Completion]:
        self._check_keys(gen_kwargs)
        options = {**self.gen_kwargs, **{k: v for k, v in gen_kwargs.items() if v is not None}}
        stops = options.pop("stop_strings", None)
        if isinstance(stops, str):
            stops = [stops]
        size = self.batch_size or max(1, len(prompts))
        for start in range(0, len(prompts), size):
            batch, ids, numbers, failed = [], [], [], {}
            for number, prompt in enumerate(prompts[start:start + size], start + 1):
                try:
                    bad = utf8_error(prompt)
                    if bad:
                        raise ValueError(bad)
                    ids.append(self.encode(prompt))
                    batch.append(prompt)
                    numbers.append(number)
                except (ValueError, TypeError) as exc:
                    if not keep_going:
                        raise ValueError(f"prompt {number}: {exc}") from exc
                    failed[number] = Completion(prompt, "", [], [], error=f"prompt {number}: {exc}")
            done = self._forward(batch, ids, options, stops, keep_going, numbers) if batch else []
            for number in range(start + 1, start + 1 + len(batch) + len(failed)):
                yield failed[number] if number in failed else done.pop(0)

    def _forward(self, batch: list[str], ids: list[list[int]], options: dict, stops, keep_going: bool,
                 numbers: list[int]) -> list[Completion]:
        early_stop = {"stop_strings": stops, "tokenizer": self.tokenizer} if stops else {}
        try:
            output = self.pipeline.forward({"input_ids": ids}, return_dict_in_generate=True, **options,
                                           **early_stop)
        except ValueError as exc:  # e.g. prompt + max_new_tokens over the context
            if not keep_going:
                raise
            if len(batch) > 1:  # find the prompt at fault: run them one by one
                return [c for p, i, n in zip(batch, ids, numbers)
                        for c in self._forward([p], [i], options, stops, keep_going, [n])]
            number = numbers[0]
            logger.error("prompt %d failed: %s", number, exc)
            return [Completion(batch[0], "", [], ids[0], error=f"prompt {number}: {exc}")]
        sequences = output["sequences"] if isinstance(output, dict) else output.sequences
        results = []
        for prompt, prompt_ids, sequence in zip(batch, ids, sequences):
            new = [int(t) for t in np.asarray(sequence).reshape(-1)[len(prompt_ids):]]
            text, _ = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stops)
            results.append(Completion(prompt, text, new, prompt_ids))
        return results

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        """Completions (new text only) of ``prompts``."""
        return [c.text for c in self.generate(prompts)]
