"""DeepSeek-V2 causal LM (YAML ``model.arch.type: DeepseekV2ForCausalLM``)."""
from __future__ import annotations

from typing import Optional

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_ext.models.causal_lm import CausalLMBase
from mindformers_ext.parallel.shard import parallel_sizes
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.deepseek2_transformer import DeepseekV2Model


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class DeepseekV2ForCausalLM(CausalLMBase):
    """DeepSeek-V2 / V2-Lite. In training the loss is the token cross-entropy plus the MoE layers'
    sequence-level balance loss (``aux_loss_alpha``), which DeepSeek adds to the gradient."""

    config_class = DeepseekV2Config

    def __init__(self, config: Optional[DeepseekV2Config] = None) -> None:
        config = config if config is not None else DeepseekV2Config()
        # MindFormers' Trainer may set ``config.moe_config`` after the config was built
        config.apply_moe_config(getattr(config, "moe_config", None))
        super().__init__(config, DeepseekV2Model(config))
        stages = parallel_sizes(config.parallel_config)[2]
        if stages > 1:
            self.lm_head.pipeline_stage = stages - 1
