"""A loaded model behind the two questions benchmarks ask of an SFT model: "respond to this
prompt" and "how likely is this continuation". Both the lm-eval-harness adapter
(lm_eval_adapter.py) and the project's own task evaluation (prompted_tasks.py) run on it, so
the same settings give the same numbers through either.

Settings are one flat set of ``key=value`` options (:class:`ModelOptions`), the syntax of
lm-eval's ``--model_args``:

    checkpoint=<dist checkpoint or run dir> | hf=<exported Hugging Face folder>   (exactly one)
    sampler=blocks steps=64 gen_length=64 block_length=32 corrector_steps=1 corrector_every=4 ...
    mc_num=128 batch_size=8 seed=1234 check_greedy=false

* **generate**: prompts are tokenized (no special tokens added), sampled by
  ``sampling.prompted.generate_responses`` with any sampler of ``sampling.generate.SAMPLERS``,
  decoded, and cut at the first of the request's ``until`` strings (the response already ends at
  the model's EOS). Prompts are sampled in a canonical order (by length, then token ids), so that a
  response does not depend on the order the requests came in (a batch's EOS filler depends on its
  longest prompt: prompted.py).
* **loglikelihood**: the context and the continuation are tokenized as lm-eval's causal models do
  (trailing spaces of the context move to the continuation; the whole text is encoded and split at
  the context's length), then scored by the Monte-Carlo ELBO (elbo.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..cli_errors import UserInputError
from ..sampling.denoiser import Denoiser

SAMPLER_HINT = "mdlm, proseco, remdm, semi_ar or blocks"


@dataclasses.dataclass
class ModelOptions:
    """Every option of the evaluation model (the module docstring shows the syntax)."""

    checkpoint: Optional[str] = None   # a distributed checkpoint, or a run dir (its latest)
    hf: Optional[str] = None           # or an exported Hugging Face folder
    tp: int = 1                        # checkpoint: tensor-parallel size to load at
    weights: str = "ema"               # checkpoint: ema or raw
    schedule: str = "loglinear"        # hf: the noise schedule (time input, samplers)
    schedule_eps: float = 1e-3
    device: Optional[str] = None       # hf: where the model runs (default: cpu; a checkpoint decides itself)
    sampler: str = "blocks"
    steps: Optional[int] = None        # default: gen_length (one token per step)
    gen_length: int = 64
    block_length: int = 32
    threshold: Optional[float] = None
    remasking: str = "low_confidence"
    temperature: float = 0.0
    eos_stop: str = "block"
    eta: float = 0.02
    top_p: float = 1.0
    use_cache: bool = True
    cache_rule: str = "reference"
    corrector_steps: int = 0
    corrector_every: int = 1
    corrector_mode: str = "argmax"
    corrector_top_k: int = 1
    corrector_early_stop: bool = True
    corrector_time: str = "tau"
    mc_num: int = 128                  # Monte-Carlo draws per loglikelihood (LLaDA: 128)
    batch_size: int = 8                # prompts per sampling batch; rows per ELBO pass
    seed: int = 1234
    check_greedy: bool = False         # loglikelihood's is_greedy (T passes per pair; LLaDA's default off)
    max_length: Optional[int] = None   # context + continuation cap (default: the model's length)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelOptions":
        """Options from strings or typed values (lm-eval passes both); an unknown key or a value
        that does not parse is a UserInputError naming it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for key, value in values.items():
            if key not in fields:
                raise UserInputError(f"unknown model option {key!r}; options: {', '.join(fields)}")
            out[key] = _coerce(key, value, fields[key].type)
        options = cls(**out)
        options.check()
        return options

    @classmethod
    def parse(cls, text: str, extra: Optional[dict] = None) -> "ModelOptions":
        """``key=value,key=value`` (lm-eval's --model_args syntax) plus ``extra``."""
        values = {}
        for item in filter(None, (s.strip() for s in (text or "").split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise UserInputError(f"model option {item!r} is not key=value")
            values[key.strip()] = value.strip()
        return cls.from_dict({**values, **(extra or {})})

    def check(self) -> None:
        if (self.checkpoint is None) == (self.hf is None):
            raise UserInputError("give exactly one of checkpoint=<checkpoint or run dir> and hf=<Hugging Face folder>")
        for key in ("gen_length", "mc_num", "batch_size", "tp"):
            if getattr(self, key) < 1:
                raise UserInputError(f"model option {key} must be >= 1, got {getattr(self, key)}")
        if self.hf is not None and (self.tp != 1 or self.weights != "ema"):
            raise UserInputError("tp and weights apply to checkpoint=; a Hugging Face folder holds one set of weights")
        if self.weights not in ("ema", "raw"):
            raise UserInputError(f"model option weights must be ema or raw, got {self.weights!r}")

    def sampler_spec(self):
        from ..sampling.generate import SamplerSpec
        from ..sampling.steps import CorrectorSettings

        try:
            corrector = CorrectorSettings(self.corrector_steps, self.corrector_every, self.corrector_mode,
                                          self.corrector_top_k, self.corrector_early_stop, time=self.corrector_time)
            return SamplerSpec(self.sampler, self.steps or self.gen_length, corrector, self.use_cache, self.eta,
                               self.block_length, self.threshold, top_p=self.top_p, cache_rule=self.cache_rule,
                               remasking=self.remasking, temperature=self.temperature, eos_stop=self.eos_stop)
        except ValueError as err:
            raise UserInputError(f"model options: {err}") from None


def _coerce(key: str, value, kind: str):
    """`value` as the field's type (the annotation's text: 'int', 'Optional[float]', ...)."""
    if isinstance(value, str) and value.lower() in ("none", "null") and kind.startswith("Optional"):
        return None
    base = kind.removeprefix("Optional[").removesuffix("]")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserInputError(f"model option {key}={value!r} is not a valid {base}") from None


class DeviceDenoiser(Denoiser):
    """A denoiser whose network lives on ``device``: inputs go there, logits come back to the CPU."""

    def __init__(self, inner, device):
        super().__init__(inner.vocab_size, inner.mask_id, inner.time_conditioned, inner.evals_per_call)
        self.inner, self.device = inner, torch.device(device)

    def logits(self, tokens, sigma, labels=None):
        return self.inner.logits(tokens.to(self.device), sigma.to(self.device), labels).float().cpu()


def load_model(options: ModelOptions):
    """A ``sampling.loading.LoadedModel`` for the options, every path checked first (one line each)."""
    from ..cli_errors import check_checkpoint, check_hf_folder, reading_checkpoint, user_input_errors
    from ..sampling.loading import load_from_checkpoint, load_from_hf

    if options.hf is not None:
        check_hf_folder(options.hf)
        with user_input_errors(ValueError):
            loaded = load_from_hf(options.hf, options.schedule, options.schedule_eps)
        if options.device and options.device != "cpu":
            model = _hf_module(loaded.denoiser).to(options.device)
            loaded.denoiser = DeviceDenoiser(loaded.denoiser, model.device)
        return loaded
    path = check_checkpoint(options.checkpoint)
    with reading_checkpoint(path), user_input_errors(ValueError):
        return load_from_checkpoint(path, tp=options.tp, weights=options.weights)


def _hf_module(denoiser):
    """The torch module inside ``sampling.denoiser.hf_denoiser``'s closure."""
    for cell in denoiser.fn.__closure__ or ():
        if isinstance(cell.cell_contents, torch.nn.Module):
            return cell.cell_contents
    raise ValueError("no torch module found in the Hugging Face denoiser")


class PromptedModel:
    """Generation and likelihood with one set of options (module docstring)."""

    def __init__(self, options: ModelOptions, loaded=None):
        self.options = options
        self.spec = options.sampler_spec()
        self.loaded = loaded if loaded is not None else load_model(options)
        self.tokenizer = self.loaded.tokenizer
        self.max_length = options.max_length or self.loaded.seq_length

    # --- tokenization ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of a context or continuation. Special-token strings (``<|eot_id|>``) become their ids,
        as a Hugging Face tokenizer reads text by default (LLaDA's harness) and as the SFT data
        holds a chat-rendered prompt (`--apply_chat_template` contexts come rendered that way,
        data/chat_template.encode_rendered); a tokenizer without special tokens reads plain text."""
        from ..cli_errors import user_input_errors

        encode = getattr(self.tokenizer, "encode_with_special_tokens", self.tokenizer.encode)
        with user_input_errors(ValueError):  # e.g. a character outside a char vocabulary
            return list(encode(text))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's causal-model split (TemplateLM._encode_pair): trailing spaces of the context
        join the continuation; the continuation is what encoding the whole adds after the context."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode(context) if context else []
        whole = self.encode(context + continuation)
        return context_ids, whole[len(context_ids):]

    def _fit(self, prefix: list[int], room: int) -> list[int]:
        """The prefix cut from the left so that `room` more tokens fit in max_length (as lm-eval's
        models truncate contexts); a continuation that alone does not fit is refused."""
        if room > self.max_length:
            raise UserInputError(f"{room} tokens to score or generate exceed the model's length {self.max_length}; "
                                 f"lower gen_length or raise max_length")
        return prefix[max(0, len(prefix) + room - self.max_length):]

    # --- the two questions ----------------------------------------------------------------------
    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(ELBO of the continuation given the context, is it greedy) for each (context, continuation)."""
        from .elbo import elbo_loglikelihoods, greedy_matches

        ids = []
        for context, continuation in pairs:
            prefix, target = self.encode_pair(context, continuation)
            ids.append((self._fit(prefix, len(target)), target))
        o = self.options
        values = elbo_loglikelihoods(self.loaded.denoiser, self.loaded.schedule, ids, o.mc_num, o.batch_size, o.seed)
        greedy = (greedy_matches(self.loaded.denoiser, self.loaded.schedule, ids, o.batch_size) if o.check_greedy
                  else [False] * len(ids))
        return list(zip(values, greedy))

    def generate(self, prompts: Sequence[str], until: Sequence[Sequence[str]] = ()) -> list[dict]:
        """{"text": the response cut at the first `until` string, "ids", "nfe", ...} per prompt, in order."""
        from ..sampling.prompted import generate_responses

        o = self.options
        encoded = [self._fit(self.encode(p), o.gen_length) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), encoded[i]))
        eos = self.tokenizer.eod
        results = generate_responses(self.spec, self.loaded.denoiser, self.loaded.schedule,
                                     [encoded[i] for i in order], o.gen_length, eos, o.seed, o.batch_size)
        out: list = [None] * len(prompts)
        for i, result in zip(order, results):
            stops = list(until[i]) if i < len(until) else []
            out[i] = {**result, "text": cut_at(self.tokenizer.decode(result["ids"]), stops)}
        return out


def cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (empty stops ignored)."""
    ends = [text.find(s) for s in stops if s and s in text]
    return text[:min(ends)] if ends else text
