"""The pre-norm decoder layer the dense families share (Llama / DeepSeek-Coder, GPT-BigCode)."""
from __future__ import annotations

from mindformers_ext.parallel.shard import ShardedCell


class PreNormDecoderLayer(ShardedCell):
    """``x + attention(attention_norm(x))`` then ``x + feed_forward(ffn_norm(x))``.

    A family's layer builds the four parts in its ``__init__``. ``rope`` is what its attention takes
    between the hidden states and the mask: ``(cos, sin)`` for rotary attention, ``()`` for none.
    """

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id

    def shard(self, dp: int, mp: int) -> None:
        """Strategies for every sub-layer."""
        for part in (self.attention_norm, self.attention, self.ffn_norm, self.feed_forward):
            part.shard(dp, mp)

    def construct(self, x, rope, mask, cache=None, slot=None, decode=False):
        """-> (output, this layer's updated cache or ())."""
        attn, cache = self.attention(self.attention_norm(x), *rope, mask, cache, slot, decode)
        x = x + attn
        return x + self.feed_forward(self.ffn_norm(x)), cache
