"""The Llama-style LLaDA masked diffusion model in plain PyTorch, for Hugging Face.

Parameter names follow GSAI-ML/LLaDA-8B-Base (model.transformer.wte / blocks.N.q_proj ... /
ln_f / ff_out). Per block, bidirectional (no causal mask) and without time input:

    h = h + drop(attn_out(Attention(rope(q_proj(RMS(h))), rope(k_proj(RMS(h))), v_proj(RMS(h)))))
    h = h + drop(ff_out(SiLU(ff_proj(RMS(h))) * up_proj(RMS(h))))
    logits = ff_out(RMS(h))

Rotary embeddings rotate the two halves of each head, in float32; k/v may have fewer heads (GQA).
Dropout (embedding, residual, attention) acts in training mode only.

The forward takes what transformers models take: input_ids or inputs_embeds, attention_mask
(1 = attend; padded keys are masked out, so a left-padded prompt gives the same outputs at its
tokens as unpadded, rotary positions being relative), output_hidden_states, return_dict. It
returns CausalLMOutputWithPast as LLaDA's own class does (logits, hidden_states), or a tuple.
`generate` works as for any transformers model (greedy or sampled left-to-right decoding, eos
and pad from generation_config.json); it is not LLaDA's diffusion sampler, which calls the
forward on a masked canvas (mask_token_id in config.json).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import modeling_outputs

# relative, as transformers loads remote code as a package (its import check, 4.46, reads
# every import outside try blocks as a required package)
from .configuration_llada import LLaDAConfig

try:
    from transformers import GenerationMixin
except ImportError:  # transformers before 4.45: PreTrainedModel is a GenerationMixin
    GenerationMixin = object

# settings this file implements with one value each; other values are refused by name
REQUIRED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "layer_norm_with_affine": True,
            "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False, "weight_tying": False,
            "rope": True, "alibi": False, "scale_logits": False, "input_emb_norm": False}


def check_config(config) -> None:
    for key, value in REQUIRED.items():
        if getattr(config, key) != value:
            raise NotImplementedError(f"LLaDA setting {key}={getattr(config, key)!r} is not implemented here "
                                      f"(only {key}={value!r})")
    if config.bias_for_layer_norm:
        raise NotImplementedError("LLaDA setting bias_for_layer_norm=True is not implemented here")


class RMSLayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        head_dim = config.d_model // config.n_heads
        kv, ffn = config.effective_n_kv_heads, config.effective_mlp_hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, kv, head_dim
        self.attention_dropout = config.attention_dropout
        self.drop = nn.Dropout(config.residual_dropout)
        self.attn_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps)
        self.ff_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv * head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv * head_dim, bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_proj = nn.Linear(config.d_model, ffn, bias=False)
        self.up_proj = nn.Linear(config.d_model, ffn, bias=False)
        self.ff_out = nn.Linear(ffn, config.d_model, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        qf, kf = q.float(), k.float()  # rotary in full precision, as LLaDA's rope_full_precision
        q = (qf * cos + rotate_half(qf) * sin).to(q.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(k.dtype)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        x = x + self.drop(self.attn_out(att.transpose(1, 2).reshape(b, s, -1)))
        h = self.ff_norm(x)
        return x + self.drop(self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        check_config(config)
        self.config = config
        rows = config.embedding_size or config.vocab_size
        self.emb_drop = nn.Dropout(config.embedding_dropout)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, config.d_model),
            blocks=nn.ModuleList([LLaDALlamaBlock(config) for _ in range(config.n_layers)]),
            ln_f=RMSLayerNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, rows, bias=False),
        ))

    def rotary(self, seq_len: int, device):
        dim = self.config.d_model // self.config.n_heads
        theta = float(self.config.rope_theta)
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, s, d]

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=False):
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.emb_drop(x)
        cos, sin = self.rotary(x.shape[1], x.device)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: which keys to attend to
        hidden = [x] if output_hidden_states else None
        for block in self.transformer.blocks:
            x = block(x, cos, sin, mask)
            if output_hidden_states:
                hidden.append(x)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden[-1] = x  # as transformers' Llama: the last hidden state after the final norm
        return self.transformer.ff_out(x), (tuple(hidden) if output_hidden_states else None)


class LLaDAModelLM(transformers.PreTrainedModel, GenerationMixin):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    main_input_name = "input_ids"

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif isinstance(module, RMSLayerNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def tie_weights(self, *args, **kwargs):
        """LLaDA's output layer is its own (weight_tying is refused): nothing to tie."""

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, **kwargs):
        """Logits of every position (a diffusion model: no loss, no cache; `labels`,
        `past_key_values` and `attention_bias` are accepted and unused, as in LLaDA's class)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("output_attentions is not supported (attention runs fused)")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits, hidden = self.model(input_ids, inputs_embeds, attention_mask, output_hidden_states)
        if not return_dict:
            return (logits, hidden) if output_hidden_states else (logits,)
        return modeling_outputs.CausalLMOutputWithPast(logits=logits, hidden_states=hidden)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """No cache: every generation step runs the whole sequence (bidirectional attention)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def can_generate(self) -> bool:
        return True
