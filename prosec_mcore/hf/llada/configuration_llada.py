"""Configuration of the LLaDA architecture for Hugging Face (`trust_remote_code=True`).

Keys and defaults follow LLaDA's own configuration (GSAI-ML/LLaDA-8B-Base, an OLMo-style model
config): a key a config.json leaves out takes the same default here as in LLaDA's code, so a
folder means the same network with either. modeling_llada.py implements the Llama-style block
and refuses, by name, the settings it does not implement.
"""
import transformers

# LLaDA's ModelConfig defaults (note: block_type "sequential", rope off, weight tying on; the
# LLaDA checkpoints' config.json sets every key).
DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "alibi_bias_max": 8.0, "rope": False, "rope_full_precision": True, "flash_attention": False,
    "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False,
    "residual_dropout": 0.1, "embedding_dropout": 0.1, "input_emb_norm": False, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "rms_norm_eps": 1e-05, "attention_layer_norm_with_affine": True,
    "max_sequence_length": 1024, "rope_theta": 10000.0, "include_qkv_bias": False, "include_bias": False,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304,
    "weight_tying": True, "eos_token_id": 50256, "pad_token_id": 50256, "mask_token_id": 50256,
    "init_device": None, "init_fn": "normal", "init_std": 0.02, "init_cutoff_factor": None, "precision": None,
}


class LLaDAConfig(transformers.PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, use_cache: bool = False, **kwargs):
        values = {**DEFAULTS, **kwargs, "use_cache": use_cache}
        values.setdefault("architectures", ["LLaDAModelLM"])
        # transformers ties input and output embeddings when tie_word_embeddings is true (its
        # default); LLaDA ties them only with weight_tying
        values.setdefault("tie_word_embeddings", bool(values["weight_tying"]))
        super().__init__(**values)
        for key, value in values.items():  # recent transformers keep only the keys they know
            if not hasattr(self, key):
                setattr(self, key, value)

    @property
    def effective_n_kv_heads(self) -> int:
        """n_kv_heads, else 1 with multi_query_attention, else n_heads (LLaDA's rule)."""
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention is True else self.n_heads
        if self.multi_query_attention is not None and self.n_kv_heads != (1 if self.multi_query_attention
                                                                           else self.n_heads):
            raise ValueError("multi_query_attention and n_kv_heads disagree; set one of them")
        return self.n_kv_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else int(self.mlp_ratio * self.d_model)

    @property
    def num_attention_heads(self):
        return self.n_heads

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @property
    def hidden_size(self):
        return self.d_model
