"""Upstream MindFormers YAMLs (tags v1.3.2 - v1.5.0) as shipped: translate them to what runs here.

Upstream shipped ``research/deepseek1_5``, ``research/deepseek2`` and ``research/wizardcoder`` YAMLs that
name classes MindFormers 1.9 no longer has, or that cannot serve these models here.
:func:`translate_config` rewrites a raw YAML dict in place (before MindFormers' template is applied),
logging one warning per substitution that names the key, the old and the new value:

=======================================================  ==============================================
upstream                                                 here
=======================================================  ==============================================
``model.arch.type: LlamaForCausalLM`` (DeepSeek-Coder)   ``DeepSeekCoderForCausalLM`` (MindFormers' own
                                                         Llama has no CPU KV cache; ours is the same
                                                         maths and reads the same checkpoints)
``model.model_config.type: LlamaConfig`` (DeepSeek-C.)   ``DeepSeekCoderConfig`` (same field names)
``processor.tokenizer.type: LlamaTokenizerFast``         ``DeepSeekCoderTokenizer`` (reads the same
(DeepSeek-Coder / V2)                                    ``tokenizer_file``, else the shipped one; adds
                                                         ``<|EOT|>``)
``auto_register: deepseek2_model.DeepseekV2ForCausalLM``  dropped: the class is registered by
(and ``deepseek2_config...``, wizardcoder modules)       ``mindformers_ext`` (``research/deepseek2/
                                                         deepseek2_model.py`` re-exports it for
                                                         ``--register_path research/deepseek2``)
``callbacks`` / ``eval_callbacks``: ``ObsMonitor``        removed (it uploaded ``output_dir`` to Huawei
                                                         OBS on AICC; gone from MindFormers 1.9)
``optimizer.type: FP32StateAdamWeightDecay``             ``AdamW`` with ``betas: [beta1, beta2]`` (the
                                                         replacement upstream's deprecation named; its
                                                         moments are float32 too)
=======================================================  ==============================================

and two adjustments that apply to every YAML, upstream's or ours:

* a top-level ``moe_config`` (upstream's MoE section) is handed to ``model.model_config.moe_config`` so
  that every run mode (predict and eval build the model without MindFormers' Trainer, which alone
  passed it on) and ``tools/check_parallel.py`` see the same experts; a value that contradicts an
  explicit ``model_config`` field is reported;
* a vocabulary that ``model_parallel`` does not divide (WizardCoder's 49153 with mp 4) replicates the
  embedding and LM head (``parallel_config.vocab_emb_dp: True``), as upstream's WizardCoder did.

:func:`migrate_file` writes the translated YAML (``tools/migrate_config.py OLD.yaml NEW.yaml``).
The runner calls :func:`translate_config` on every YAML it loads, right after reading it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["Change", "translate_config", "migrate_file", "upstream_family", "OBSOLETE_CALLBACKS", "MOE_CONFIG_FIELDS"]

OBSOLETE_CALLBACKS = ("ObsMonitor",)
_DEEPSEEK_VOCABS = (102400, 32256)
# auto_register module names of upstream's research packages -> the package of ours that registers them
_OUR_MODULES = {
    "deepseek2_config": "research.deepseek2", "deepseek2_model": "research.deepseek2",
    "deepseek2": "research.deepseek2", "deepseek2_transformer": "research.deepseek2",
    "wizardcoder": "research.wizardcoder", "wizardcoder_config": "research.wizardcoder",
    "wizardcoder_tokenizer": "research.wizardcoder", "deepseek1_5": "research.deepseek1_5",
}
# upstream moe_config key -> the DeepSeek-V2 model_config field it sets (research/deepseek2/deepseek2_config.py)
MOE_CONFIG_FIELDS = {"expert_num": "n_routed_experts", "shared_expert_num": "n_shared_experts",
                     "num_experts_chosen": "num_experts_per_tok", "moe_intermediate_size": "moe_intermediate_size",
                     "first_k_dense_replace": "first_k_dense_replace", "topk_method": "topk_method",
                     "n_group": "n_group", "topk_group": "topk_group", "routed_scaling_factor": "routed_scaling_factor",
                     "norm_topk_prob": "norm_topk_prob", "capacity_factor": "capacity_factor"}


@dataclass(frozen=True)
class Change:
    """One change :func:`translate_config` made: the key, the old and new values, and why."""

    key: str
    old: Any
    new: Any
    why: str
    substitution: bool = True  # a renamed / removed upstream type (warning) rather than a pass-through (info)

    def message(self, source: str) -> str:
        new = "removed" if self.new is None else repr(self.new)
        return f"{source}: {self.key}: {self.old!r} -> {new} ({self.why})"


def _section(raw: dict, *path: str) -> Optional[dict]:
    node: Any = raw
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def upstream_family(raw: dict, source: str = "") -> Optional[str]:
    """``'deepseek_coder'``, ``'deepseek2'``, ``'wizardcoder'`` or None for a raw YAML dict."""
    arch = str((_section(raw, "model", "arch") or {}).get("type") or "")
    model_config = _section(raw, "model", "model_config") or {}
    kind = str(model_config.get("type") or "")
    if "Deepseek" in arch or "Deepseek" in kind or "DeepseekV2" in kind:
        return "deepseek2"
    if "WizardCoder" in arch or "WizardCoder" in kind:
        return "wizardcoder"
    if "DeepSeekCoder" in arch or "DeepSeekCoder" in kind:
        return "deepseek_coder"
    if arch == "LlamaForCausalLM" or kind == "LlamaConfig":
        model_name = str((_section(raw, "trainer") or {}).get("model_name") or "")
        tokenizer = _section(raw, "processor", "tokenizer") or {}
        hints = ("deepseek" in model_name.lower() or "deepseek" in os.path.basename(source).lower()
                 or model_config.get("vocab_size") in _DEEPSEEK_VOCABS
                 or "begin▁of▁sentence" in str(tokenizer.get("bos_token") or ""))
        return "deepseek_coder" if hints else None
    return None


def _rename_types(raw: dict, family: Optional[str], changes: list) -> None:
    model = _section(raw, "model") or {}
    arch, model_config = _section(model, "arch"), _section(model, "model_config")
    if family == "deepseek_coder":
        if arch is not None and arch.get("type") == "LlamaForCausalLM":
            arch["type"] = "DeepSeekCoderForCausalLM"
            changes.append(Change("model.arch.type", "LlamaForCausalLM", "DeepSeekCoderForCausalLM",
                                  "a DeepSeek-Coder YAML: MindFormers' Llama has no CPU KV cache; ours computes the "
                                  "same model from the same checkpoint names"))
        if model_config is not None and model_config.get("type") == "LlamaConfig":
            model_config["type"] = "DeepSeekCoderConfig"
            changes.append(Change("model.model_config.type", "LlamaConfig", "DeepSeekCoderConfig",
                                  "same field names, DeepSeek-Coder defaults"))
    tokenizer = _section(raw, "processor", "tokenizer")
    if family in ("deepseek_coder", "deepseek2") and tokenizer is not None \
            and tokenizer.get("type") == "LlamaTokenizerFast":
        tokenizer["type"] = "DeepSeekCoderTokenizer"
        notes = []
        if "unk_token" in tokenizer and str(tokenizer["unk_token"]) in ("<unk>", "None"):
            notes.append(f"unk_token {tokenizer.pop('unk_token')!r} dropped: the DeepSeek BPE has none")
        vocab_file = str(tokenizer.get("vocab_file"))
        if "vocab_file" in tokenizer and (vocab_file.endswith(".model") or vocab_file == "None"):
            notes.append(f"vocab_file {tokenizer.pop('vocab_file')!r} dropped: DeepSeek ships tokenizer.json, "
                         "no sentencepiece model")
        changes.append(Change("processor.tokenizer.type", "LlamaTokenizerFast", "DeepSeekCoderTokenizer",
                              "reads tokenizer_file (a DeepSeek tokenizer.json), else the shipped one, and adds "
                              "<|EOT|>" + "".join(f"; {n}" for n in notes)))


def _drop_auto_register(raw: dict, changes: list) -> None:
    for path in (("model", "model_config"), ("model", "arch"), ("processor", "tokenizer"), ("processor",)):
        node = _section(raw, *path)
        if node is None or "auto_register" not in node:
            continue
        reference = str(node["auto_register"])
        module, _, cls = reference.rpartition(".")
        ours = _OUR_MODULES.get(module)
        if ours is None:
            continue  # somebody else's module: MindFormers' auto_register handles it with --register_path
        node.pop("auto_register")
        changes.append(Change(".".join(path) + ".auto_register", reference, None,
                              f"{cls} is registered by {ours} when mindformers_ext is imported; "
                              "--register_path is not needed"))


def _drop_callbacks(raw: dict, changes: list) -> None:
    removed: dict[str, list[str]] = {}
    for key in ("callbacks", "eval_callbacks"):
        items = raw.get(key)
        if not isinstance(items, list):
            continue
        kept = []
        for i, item in enumerate(items):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in OBSOLETE_CALLBACKS:
                removed.setdefault(kind, []).append(f"{key}.{i}")
            else:
                kept.append(item)
        if len(kept) != len(items):
            if kept:
                raw[key] = kept
            else:
                raw.pop(key)
    target = raw.get("remote_save_url")
    note = (f"; remote_save_url {target!r} gets nothing" if isinstance(target, str)
            and target.startswith(("obs://", "s3://")) else "")
    for kind, where in removed.items():
        changes.append(Change(", ".join(f"{w}.type" for w in where), kind, None,
                              "uploaded output_dir to Huawei OBS on AICC; not in MindFormers 1.9, outputs stay in "
                              f"output_dir{note}"))


def _map_optimizer(raw: dict, changes: list) -> None:
    optimizer = _section(raw, "optimizer")
    if optimizer is None or optimizer.get("type") != "FP32StateAdamWeightDecay":
        return
    beta1, beta2 = optimizer.pop("beta1", 0.9), optimizer.pop("beta2", 0.999)
    optimizer["type"] = "AdamW"
    optimizer.setdefault("betas", [beta1, beta2])
    changes.append(Change("optimizer.type", "FP32StateAdamWeightDecay", "AdamW",
                          f"removed from MindFormers 1.9; AdamW keeps float32 moments too; beta1/beta2 -> "
                          f"betas {optimizer['betas']}"))


def _pass_moe_config(raw: dict, family: Optional[str], changes: list) -> None:
    moe = raw.get("moe_config")
    model_config = _section(raw, "model", "model_config")
    if not isinstance(moe, dict) or model_config is None or family != "deepseek2":
        return
    if int(moe.get("expert_num", 1) or 1) <= 1:
        return
    conflicts = [f"moe_config.{theirs} {moe[theirs]!r} vs model.model_config.{ours} {model_config[ours]!r}"
                 for theirs, ours in MOE_CONFIG_FIELDS.items()
                 if theirs in moe and ours in model_config and moe[theirs] != model_config[ours]]
    if "moe_config" not in model_config:
        model_config["moe_config"] = copy.deepcopy(moe)
        changes.append(Change("moe_config", "top level", "model.model_config.moe_config",
                              "so that predict, eval and check_parallel build the same experts as training",
                              substitution=False))
    if conflicts:
        changes.append(Change("moe_config", "conflicting", "model.model_config wins",
                              "explicit model_config fields take precedence: " + "; ".join(conflicts)))


def _replicate_indivisible_vocab(raw: dict, changes: list) -> None:
    parallel = _section(raw, "parallel_config")
    model_config = _section(raw, "model", "model_config") or {}
    if parallel is None:
        return
    mp, vocab = parallel.get("model_parallel") or 1, model_config.get("vocab_size")
    if not isinstance(mp, int) or mp <= 1 or not isinstance(vocab, int) or vocab % mp == 0:
        return
    if parallel.get("vocab_emb_dp", True) is False:
        parallel["vocab_emb_dp"] = True
        changes.append(Change("parallel_config.vocab_emb_dp", False, True,
                              f"vocab_size {vocab} is not divisible by model_parallel {mp}: the embedding and LM head "
                              "are replicated instead of split, as upstream MindFormers did"))


def translate_config(raw: dict, source: str = "config", warn: Optional[Callable[[str], None]] = None,
                     info: Optional[Callable[[str], None]] = None) -> list[Change]:
    """Translate an upstream MindFormers YAML dict in place (see the module docstring); returns the
    changes, each logged once (``warn`` for substitutions, ``info`` for pass-throughs; default:
    MindFormers' logger). A YAML of ours comes back unchanged."""
    if not isinstance(raw, dict):
        return []
    family = upstream_family(raw, source)
    changes: list[Change] = []
    _rename_types(raw, family, changes)
    _drop_auto_register(raw, changes)
    _drop_callbacks(raw, changes)
    _map_optimizer(raw, changes)
    _pass_moe_config(raw, family, changes)
    _replicate_indivisible_vocab(raw, changes)
    if changes and (warn is None or info is None):
        from mindformers.tools.logger import logger  # pylint: disable=import-outside-toplevel
        warn = warn or logger.warning
        info = info or logger.info
    for change in changes:
        (warn if change.substitution else info)(change.message(source))
    return changes


def migrate_file(old: str, new: str, warn: Optional[Callable[[str], None]] = None) -> list[Change]:
    """Write ``old`` (an upstream YAML) translated to ``new``; returns the changes. Comments are not
    kept; a header lists what changed."""
    import yaml  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(old):
        raise FileNotFoundError(f"{old}: no such YAML file")
    with open(old, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{old}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{old}: the top level of the YAML must be a mapping")
    messages: list[str] = []
    changes = translate_config(raw, old, warn=warn or messages.append, info=messages.append)
    header = [f"# migrated from {os.path.basename(old)} by tools/migrate_config.py"]
    header += [f"#   {c.key}: {c.old!r} -> {'removed' if c.new is None else repr(c.new)}" for c in changes]
    if not changes:
        header.append("#   (nothing to change)")
    body = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, default_flow_style=False)
    tmp = new + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n" + body)
    os.replace(tmp, new)
    return changes
