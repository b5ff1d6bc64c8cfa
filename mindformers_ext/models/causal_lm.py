"""What every causal LM of ours shares: LM head, training loss and the graph entry points of decoding.

A family supplies ``self.model`` (its decoder stack) with a ``cache_spec``
(:class:`mindformers_ext.cache.CacheSpec`) and one forward for training, prefill and decode:
``construct(input_ids, position_ids, mask, cache=None, slot=None, decode=False) -> (hidden, cache,
aux)``, where ``cache`` is the flat tuple of :class:`mindformers_ext.cache.KVCache` tensors (updated
at ``slot``) and ``aux`` the MoE balance loss added to the training loss (0 for dense models).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindformers.models.modeling_utils import PreTrainedModel

from mindformers_ext.cache import MASK_VALUE
from mindformers_ext.generation.decoding import DecodingMixin
from mindformers_ext.layers.linear import Linear
from mindformers_ext.parallel.shard import ShardedCell, parallel_sizes, pin_stages, vocab_emb_dp


class CausalLMLoss(ShardedCell):
    """Mean token cross-entropy over labels that are not ``ignore_index``."""

    def __init__(self, vocab_size: int, ignore_index: int = -100) -> None:
        super().__init__()
        self.vocab_size, self.ignore_index = vocab_size, ignore_index
        self.log_softmax = ops.LogSoftmax(-1)
        self.cast = ops.Cast()

    def shard(self, dp: int, mp: int) -> None:  # pylint: disable=unused-argument
        """Softmax over the (whole) vocabulary axis; split rows over data parallel."""
        self.shard_op("log_softmax", self.log_softmax, ((dp, 1),), (("B*S", self.vocab_size),))

    def construct(self, logits, labels):
        logp = self.log_softmax(self.cast(ops.reshape(logits, (-1, self.vocab_size)), ms.float32))
        labels = ops.reshape(labels, (-1,))
        valid = labels != self.ignore_index
        safe = ops.select(valid, labels, ops.zeros_like(labels))
        picked = ops.gather_elements(logp, 1, ops.expand_dims(safe, -1)).squeeze(-1)
        weights = self.cast(valid, ms.float32)
        return -(picked * weights).sum() / ops.maximum(weights.sum(), 1.0)


def causal_mask(seq_len):
    """Additive (1, 1, S, S) mask: 0 on and below the diagonal, MASK_VALUE above."""
    pos = ops.arange(seq_len)
    future = ops.expand_dims(pos, 0) > ops.expand_dims(pos, 1)
    mask = ops.cast(future, ms.float32) * MASK_VALUE
    return ops.reshape(mask, (1, 1, seq_len, seq_len))


class CausalLMBase(DecodingMixin, PreTrainedModel):
    """LM head + loss on top of a family's decoder stack; ``generate`` comes from :class:`DecodingMixin`.

    ``construct(input_ids, labels=None)`` follows MindFormers' Llama convention in training: the
    inputs are tokens[:, :-1] and the targets labels[:, 1:] (or input_ids[:, 1:] without labels);
    the loss is their cross-entropy plus the model's aux loss (DeepSeek-V2's MoE balance loss,
    ``aux_loss_alpha``). In inference it returns float32 logits for every position.
    """

    base_model_prefix = "model"

    def __init__(self, config, model: nn.Cell) -> None:
        super().__init__(config, auto_prefix=True)
        self.model = model
        dp, mp, pp, _ = parallel_sizes(config.parallel_config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, config.compute_dtype,
                              config.param_init_type, getattr(config, "initializer_range", 0.02))
        pin_stages(pp, last=(self.lm_head,))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.tok_embeddings.embedding_weight
            if pp > 1:  # the first stage's table is also read by the last stage
                self.lm_head.weight.add_pipeline_stage(pp - 1)
        if vocab_emb_dp(config.parallel_config):
            self.lm_head.shard_column(dp, 1)
        else:
            self.lm_head.shard_column(dp, mp)
        self.loss = CausalLMLoss(config.vocab_size, getattr(config, "ignore_token_id", -100))
        self.loss.shard(dp, mp)
        self.cast = ops.Cast()
        # every parameter exists now (the family's stack is passed in): load config.checkpoint_name_or_path
        self.load_checkpoint(config)

    def load_checkpoint(self, config) -> None:
        """MindFormers' hook: load ``config.checkpoint_name_or_path`` (a checkpoint file or directory).

        Unlike MindFormers' default (which skips whatever does not match), the checkpoint must hold a
        weight of the right shape for every parameter and nothing of another model; a missing path
        or a non-matching file raises :class:`mindformers_ext.checkpoint.CheckpointError`. A directory
        loads the newest checkpoint in it that fits. Empty / None: nothing is loaded.
        """
        path = getattr(config, "checkpoint_name_or_path", None)
        if path:
            from mindformers_ext.checkpoint import load_checkpoint_into  # pylint: disable=import-outside-toplevel

            load_checkpoint_into(self, str(path), what="model_config.checkpoint_name_or_path")

    def logits(self, hidden):
        """float32 vocabulary logits of decoder outputs."""
        return self.cast(self.lm_head(hidden), ms.float32)

    def construct(self, input_ids, labels=None):
        if self.training:
            tokens = input_ids[:, :-1]
            targets = input_ids[:, 1:] if labels is None else labels[:, 1:]
        else:
            tokens = input_ids
        bs, seq = tokens.shape
        position_ids = ops.broadcast_to(ops.expand_dims(ops.arange(seq, dtype=ms.int32), 0), (bs, seq))
        hidden, _, aux = self.model(tokens, position_ids, causal_mask(seq))
        logits = self.logits(hidden)
        if self.training:
            return self.loss(logits, targets) + aux
        return logits

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """MindFormers' hook; our ``generate`` builds its own inputs."""
        return {"input_ids": ms.Tensor(input_ids, ms.int32)}
