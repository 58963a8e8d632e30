"""Configuration of the LLaDA architecture for Hugging Face (`trust_remote_code=True`).

Keys follow GSAI-ML/LLaDA-8B-Base's config.json (an OLMo-style model config); only the settings
of the Llama-style LLaDA block are meaningful here, the others are kept for compatibility.
"""
import transformers


class LLaDAConfig(transformers.PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int = 32, n_layers: int = 32,
                 mlp_hidden_size: int = 12288, vocab_size: int = 126464, embedding_size: int = 126464,
                 rope_theta: float = 500000.0, rms_norm_eps: float = 1e-5, max_sequence_length: int = 4096,
                 mask_token_id: int = 126336, block_type: str = "llama", activation_type: str = "silu",
                 layer_norm_type: str = "rms", weight_tying: bool = False, include_bias: bool = False,
                 include_qkv_bias: bool = False, rope: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_hidden_size, self.vocab_size, self.embedding_size = mlp_hidden_size, vocab_size, embedding_size
        self.rope_theta, self.rms_norm_eps, self.max_sequence_length = rope_theta, rms_norm_eps, max_sequence_length
        self.mask_token_id, self.block_type, self.activation_type = mask_token_id, block_type, activation_type
        self.layer_norm_type, self.weight_tying, self.include_bias = layer_norm_type, weight_tying, include_bias
        self.include_qkv_bias, self.rope = include_qkv_bias, rope
