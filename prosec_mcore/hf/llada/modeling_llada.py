"""The Llama-style LLaDA masked diffusion model in plain PyTorch, for Hugging Face.

Parameter names follow GSAI-ML/LLaDA-8B-Base (model.transformer.wte / blocks.N.q_proj ... /
ln_f / ff_out). Per block, bidirectional (no causal mask) and without time input:

    h = h + attn_out(Attention(rope(q_proj(RMS(h))), rope(k_proj(RMS(h))), v_proj(RMS(h))))
    h = h + ff_out(SiLU(ff_proj(RMS(h))) * up_proj(RMS(h)))
    logits = ff_out(RMS(h))

Rotary embeddings rotate the two halves of each head; k/v may have fewer heads (GQA).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import modeling_outputs

try:
    from .configuration_llada import LLaDAConfig
except ImportError:  # loaded as a plain module
    from configuration_llada import LLaDAConfig


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
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, head_dim
        self.attn_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps)
        self.ff_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * head_dim, bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        if config.block_type != "llama" or config.weight_tying or config.include_bias:
            raise NotImplementedError("only the Llama-style LLaDA block without biases and without weight tying")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList([LLaDALlamaBlock(config) for _ in range(config.n_layers)]),
            ln_f=RMSLayerNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
        ))

    def forward(self, input_ids):
        dim = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, device=input_ids.device).float() / dim))
        freqs = torch.outer(torch.arange(input_ids.shape[1], device=input_ids.device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, s, d]
        x = self.transformer.wte(input_ids)
        for block in self.transformer.blocks:
            x = block(x, cos, sin)
        return self.transformer.ff_out(self.transformer.ln_f(x))


class LLaDAModelLM(transformers.PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor = None, return_dict=None, **kwargs):
        logits = self.model(input_ids)
        if return_dict is False:
            return (logits,)
        return modeling_outputs.MaskedLMOutput(logits=logits, loss=None)
