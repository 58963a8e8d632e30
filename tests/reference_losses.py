"""The loss code as it was before issue 16 (prosec_mcore/diffusion/losses.py at that point), kept
unchanged as the reference that tests/unit/test_logits_memory.py compares the current code with
bit for bit, and that benchmarks/logits_memory.py measures as "before":

* `suppress_invalid` makes an out-of-place copy of the logits with the never-predicted ids at -inf;
* `vocab_parallel_argmax` takes the argmax of an fp32 copy of the logits (first maximal id; across
  tensor-parallel shards, the lowest rank among equal maxima).
"""
import torch
from megatron.core import parallel_state

from prosec_mcore.diffusion import losses
from prosec_mcore.diffusion.losses import cross_entropy


def suppress_invalid(logits, invalid):
    return logits.masked_fill(invalid, float("-inf"))


@torch.no_grad()
def vocab_parallel_argmax(logits):
    local_max, local_idx = logits.float().max(dim=-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local_idx
    global_idx = local_idx + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = parallel_state.get_tensor_model_parallel_group()
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(global_idx) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(idxs, global_idx.contiguous(), group=group)
    best_rank = torch.stack(maxes).argmax(dim=0, keepdim=True)
    return torch.stack(idxs).gather(0, best_rank).squeeze(0)


def mdm_terms(logits, clean, masked, weight, invalid, corrector_input="all", fusion="none"):
    logits = suppress_invalid(logits, invalid)
    y = vocab_parallel_argmax(logits.detach())
    ce = cross_entropy(logits, clean, fusion)
    per_token = torch.where(masked, ce * weight[:, None], torch.zeros_like(ce))
    if corrector_input == "masked":
        y = torch.where(masked, y, clean)
    n_masked = masked.sum().clamp(min=1)
    accuracy = ((y == clean) & masked).sum().float() / n_masked
    return losses.MDMTerms(per_token=per_token, corrector_input=y, accuracy_on_masked=accuracy)


def sc_terms(logits, clean, corrector_input, weight, invalid, opts, keep=None):
    logits = suppress_invalid(logits, invalid)
    prediction = vocab_parallel_argmax(logits.detach())
    ce = cross_entropy(logits, clean, opts.cross_entropy_fusion)
    w = weight[:, None] if opts.weighted_corrector_loss else torch.ones_like(weight)[:, None]
    errors = corrector_input != clean
    if opts.errors_upweighted:
        per_token = torch.where(errors, w * ce, -w * torch.exp(-ce))
    else:
        per_token = w * ce
    if keep is not None:
        per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
        ce = torch.where(keep, ce, torch.zeros_like(ce))
        errors = errors & keep
    return losses.SCTerms(per_token=per_token, nll_per_token=ce.detach(),
                          correct_on_errors=((prediction == clean) & errors).sum().float(),
                          num_errors=errors.sum().float())
