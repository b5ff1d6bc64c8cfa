"""WizardCoder configuration: the GPT-BigCode family config with WizardCoder-15B's shapes as defaults.

``WizardCoderConfig()`` is WizardCoder-15B-V1.0 (StarCoder-15B architecture, 49153-token vocabulary
with ``[PAD]`` = 49152, exact GELU); ``from_preset`` gives the others. Upstream MindFormers' field
names (``n_position``, ``embedding_size``, ``eos_token``, ``pad_token``, ``layernorm_dtype``,
``softmax_dtype``, dropout rates) are accepted, so the seed's YAMLs load.
"""
from __future__ import annotations

import copy
from typing import Any

from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.models.gpt_bigcode_config import GPTBigCodeFamilyConfig

# Shapes of the released checkpoints (their HF config.json files).
PRESETS: dict[str, dict[str, Any]] = {
    "wizardcoder-15b": dict(hidden_size=6144, num_layers=40, num_heads=48, intermediate_size=24576,
                            n_position=8192, vocab_size=49153, multi_query=True, hidden_act="gelu",
                            layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=49152,
                            seq_length=2048),
    "starcoder-15b": dict(hidden_size=6144, num_layers=40, num_heads=48, intermediate_size=24576,
                          n_position=8192, vocab_size=49152, multi_query=True, hidden_act="gelu_pytorch_tanh",
                          layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                          seq_length=8192),
}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class WizardCoderConfig(GPTBigCodeFamilyConfig):
    """WizardCoder config; defaults are WizardCoder-15B (see ``PRESETS``)."""

    model_type = "wizardcoder"

    def __init__(self, **kwargs: Any) -> None:
        merged = dict(PRESETS["wizardcoder-15b"])
        # upstream spellings override the preset's canonical keys they stand for
        for upstream, ours in (("embedding_size", "hidden_size"), ("max_position_embedding", "n_position"),
                               ("eos_token", "eos_token_id"), ("pad_token", "pad_token_id")):
            if upstream in kwargs and ours not in kwargs:
                kwargs[ours] = kwargs.pop(upstream)
        if ("expand_ratio" in kwargs or "hidden_size" in kwargs) and kwargs.get("intermediate_size") is None:
            merged.pop("intermediate_size")  # expand_ratio (4) x hidden_size
        merged.update(kwargs)
        super().__init__(**merged)
        self._replicate_indivisible_vocab()

    def _replicate_indivisible_vocab(self) -> None:
        """WizardCoder's 49153-token vocabulary does not split over model parallel 2, 4 or 8: replicate the
        embedding and the (tied) LM head then, as upstream MindFormers' WizardCoder did, with a warning."""
        parallel = self.parallel_config
        mp = int((parallel.get("model_parallel") if isinstance(parallel, dict)
                  else getattr(parallel, "model_parallel", 1)) or 1)
        split = not (parallel.get("vocab_emb_dp", True) if isinstance(parallel, dict)
                     else getattr(parallel, "vocab_emb_dp", True))
        if mp > 1 and split and self.vocab_size % mp:
            logger.warning("vocab_size %d is not divisible by model_parallel %d: the embedding and LM head are "
                           "replicated (parallel_config.vocab_emb_dp: True) instead of split, as upstream "
                           "MindFormers' WizardCoder did", self.vocab_size, mp)
            parallel = copy.deepcopy(parallel)  # the object may be shared with the rest of the run
            if isinstance(parallel, dict):
                parallel["vocab_emb_dp"] = True
            else:
                parallel.vocab_emb_dp = True
            self.parallel_config = parallel

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "WizardCoderConfig":
        """Config of a released model by name (see ``PRESETS``), with keyword overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown GPT-BigCode preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
