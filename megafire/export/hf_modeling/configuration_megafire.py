"""Configuration of a megafire decoder exported to Hugging Face format (remote code).

Shipped next to the weights by ``megafire export`` and loaded with
``AutoConfig.from_pretrained(DIR, trust_remote_code=True)``. Self-contained: needs only
transformers (4.4x or 5.x).

The architecture is Llama's block (pre-norm RMSNorm, grouped-query attention, SwiGLU MLP)
with megafire's position encodings: ``position_encoding`` names one of nope, learned,
sinusoidal, rope, alibi, kerple_log, kerple_power, t5, fire, and ``position_options``
holds every option of that encoding, resolved to explicit values at export time.
"""
from transformers import PretrainedConfig

POSITION_KINDS = {"nope": "none", "learned": "absolute", "sinusoidal": "absolute", "rope": "rotary",
                  "alibi": "bias", "kerple_log": "bias", "kerple_power": "bias", "t5": "bias", "fire": "bias"}


class MegafireConfig(PretrainedConfig):
    model_type = "megafire"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                 rms_norm_eps=1e-5, initializer_range=0.02, max_position_embeddings=2048, train_length=2048,
                 linear_bias=False, position_encoding="fire", position_options=None, use_cache=True,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3, **kwargs):
        if position_encoding not in POSITION_KINDS:
            raise ValueError(f"position_encoding={position_encoding!r} is not one of {', '.join(POSITION_KINDS)}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.train_length = train_length        # the longest length trained on (informational)
        self.linear_bias = linear_bias
        self.position_encoding = position_encoding
        self.position_options = dict(position_options or {})
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def position_kind(self) -> str:
        """none | absolute | rotary | bias."""
        return POSITION_KINDS[self.position_encoding]
