"""The ProSeCo DiT in plain PyTorch, for Hugging Face (`AutoModelForMaskedLM`, trust_remote_code).

Parameter names follow the reference checkpoints (backbone.vocab_embed.embedding,
backbone.blocks.N.attn_qkv.weight, ...). The network, per block:

    c = SiLU(MLP(sinusoid(sigma)))                        (sigma := 0 unless time_conditioning)
    shift/scale/gate x 2 = adaLN_modulation(c)
    h = h + gate_a * attn_out(Attention(rope(attn_qkv(LN(h) * (1 + scale_a) + shift_a))))
    h = h + gate_m * MLP(LN(h) * (1 + scale_m) + shift_m)
    logits = linear(LN(h) * (1 + scale) + shift)          (final layer, its own adaLN)

Attention is bidirectional; rotary embeddings rotate the two halves of each head (GPT-NeoX
style) of queries and keys. Logits are raw: a diffusion sampler suppresses the mask token.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import modeling_outputs

try:
    from .configuration_proseco import ProsecoConfig
except ImportError:  # loaded as a plain module
    from configuration_proseco import ProsecoConfig


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float = 10_000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, seq_len: int, device):
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # [1, s, 1, d]


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.float(), [self.dim]).to(x.dtype) * self.weight


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DDiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, bias=True), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim, bias=True))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def attention(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.attn_qkv(x).view(b, s, 3, self.n_heads, -1).unbind(2)  # each [b, s, h, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, s, -1)

    def forward(self, x, cos, sin, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        drop = self.dropout if self.training else 0.0
        attn = self.attn_out(self.attention(modulate(self.norm1(x), shift_a, scale_a), cos, sin))
        x = x + gate_a * F.dropout(attn, p=drop)
        mlp = self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x + gate_m * F.dropout(mlp, p=drop)


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return self.embedding[x]


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DITBackbone(nn.Module):
    def __init__(self, config: ProsecoConfig):
        super().__init__()
        if config.cfg:
            raise NotImplementedError("classifier-free-guidance conditioning (cfg=True) is not supported here")
        self.config = config
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.hidden_dim // config.n_heads)
        self.blocks = nn.ModuleList([DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim, dropout=config.dropout)
                                     for _ in range(config.n_blocks)])
        self.output_layer = DDitFinalLayer(config.hidden_dim, config.vocab_size, config.cond_dim)

    def forward(self, indices, sigma):
        if not self.config.time_conditioning:
            sigma = torch.zeros_like(sigma)
        c = F.silu(self.sigma_map(sigma))
        x = self.vocab_embed(indices)
        cos, sin = self.rotary_emb(indices.shape[1], indices.device)
        for block in self.blocks:
            x = block(x, cos, sin, c)
        return self.output_layer(x, c)


class Proseco(transformers.PreTrainedModel):
    config_class = ProsecoConfig
    base_model_prefix = "proseco"

    def __init__(self, config: ProsecoConfig):
        super().__init__(config)
        self.backbone = DITBackbone(config)
        self.post_init()  # transformers' bookkeeping (tied weights, init of missing weights)

    def forward(self, input_ids: torch.LongTensor = None, timesteps: torch.FloatTensor = None, return_dict=None, **kwargs):
        if timesteps is None:
            timesteps = torch.zeros(input_ids.shape[0], device=input_ids.device)
        logits = self.backbone(input_ids, timesteps)
        if return_dict is False:
            return (logits,)
        return modeling_outputs.MaskedLMOutput(logits=logits, loss=None)
