"""Weight initialisation that does not depend on the parallel layout.

Why: megatron draws initial weights from RNG streams whose seeds depend on
the rank (Megatron-LM offsets the seed by ``100 * pipeline_rank``; without
``use_cpu_initialization`` the tensor-parallel stream is offset by
``tp_rank`` too). The same config trained at TP1/PP1 and at TP2/PP2 then
starts from different weights, which makes layouts impossible to compare and
a run impossible to resume on a different layout with the same result.

Idea: give every parameter a *global* identity and derive its values from
that identity alone.

* Global name. A parameter's name inside a model chunk is local: under
  pipeline parallelism stage 1 calls its first layer ``decoder.layers.0``
  although it is layer 3 of the network. megatron stores the global,
  1-based index on each layer as ``layer.layer_number`` (interleaved virtual
  stages included), so ``decoder.layers.<i>`` is renamed to
  ``decoder.layers.<layer_number - 1>``. The copy of a tied word embedding
  that the last pipeline stage keeps as ``output_layer.weight`` (marked
  ``shared_embedding``) is named ``embedding.word_embeddings.weight`` so it
  gets the same values as the original on the first stage.
* Full tensor from a per-name seed. The *full* (unsplit) tensor is drawn on
  CPU in float32 from a generator seeded with ``hash(seed, global name)``,
  using the init function megatron would use for that parameter
  (``embedding_init_method`` for embeddings, ``output_layer_init_method``
  for the output projections ``linear_proj``/``linear_fc2`` and
  ``init_method`` for every other matrix).
* Tensor-parallel slice. Parameters split by tensor parallelism carry
  ``tensor_model_parallel``, ``partition_dim`` and ``partition_stride``;
  this rank keeps the same slice that megatron's own CPU initialisation
  keeps (chunks of ``size / stride`` along ``partition_dim``, every
  ``tp_size``-th chunk starting at ``tp_rank``).

Parameters initialised to a constant (biases and norm weights by megatron,
the zero-initialised adaLN modulation matrices by the ProSeCo model) are
already layout-independent and are left as they are; a vector that is not
constant is an error (it needs a rule here).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import torch

EMBEDDING_NAME = "embedding.word_embeddings.weight"
# Matrices that megatron initialises with config.output_layer_init_method.
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (they keep the model as `.module`)."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def global_parameter_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Map each parameter of one (unwrapped) model chunk to its layout-independent name."""
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    layer_prefixes = {}
    for qualname, module in model.named_modules():
        head, _, index = qualname.rpartition(".")
        if isinstance(module, BaseTransformerLayer) and index.isdigit():
            layer_prefixes[qualname] = f"{head}.{module.layer_number - 1}"

    names = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in layer_prefixes:
                name = ".".join([layer_prefixes[prefix]] + parts[cut:])
                break
        if name == "output_layer.weight" and getattr(param, "shared_embedding", False):
            name = EMBEDDING_NAME
        names[name] = param
    return names


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, a parameter's global name): the same on every rank."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_function(config, name: str) -> Callable[[torch.Tensor], None]:
    if name.startswith("embedding."):
        return config.embedding_init_method
    if name.endswith(_OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    return config.init_method


def full_shape(param: torch.nn.Parameter, tp_size: int) -> list[int]:
    """The unsplit shape of a (possibly tensor-parallel) parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def tp_slice(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of `full`, split exactly as megatron splits a master weight."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, param.partition_stride
    chunk = param.shape[dim] // stride
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def _draw(init_fn: Callable, shape: list[int], seed: int) -> torch.Tensor:
    """Run `init_fn` on a fresh float32 CPU tensor with the CPU generator seeded by `seed`.

    megatron's init functions draw from the default CPU generator for CPU
    tensors; it is forked so the caller's RNG stream is not disturbed.
    """
    full = torch.empty(shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        init_fn(full)
    return full


@torch.no_grad()
def init_weights_layout_independent(model_chunks: Iterable[torch.nn.Module], seed: int) -> None:
    """Re-initialise all matrices of `model_chunks` so they equal the TP1/PP1 weights.

    Call after building the model on every rank (before or after wrapping it
    in DDP, before building the optimizer's fp32 copies).
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        model = _unwrap(chunk)
        for name, param in global_parameter_names(model).items():
            constant = param.numel() > 0 and bool((param == param.flatten()[0]).all())
            if param.dim() < 2 and not constant:
                raise ValueError(
                    f"init_weights_layout_independent: vector parameter {name} is not "
                    f"constant; add a rule for it"
                )
            if constant:
                # Constant initialisations (biases, norm weights, the zero-initialised adaLN
                # modulations) are the same in every layout already.
                continue
            full = _draw(_init_function(model.config, name), full_shape(param, tp_size),
                         name_seed(seed, name))
            param.copy_(tp_slice(full, param, tp_rank, tp_size))
