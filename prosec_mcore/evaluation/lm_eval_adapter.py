"""The lm-evaluation-harness model ``prosec``: any lm-eval task on a ProSeCo / MDLM / LLaDA model.

    python tools/lm_eval_prosec.py --model prosec \\
        --model_args checkpoint=runs/sft,sampler=blocks,steps=64,gen_length=64,block_length=32,corrector_steps=1 \\
        --tasks gsm8k --batch_size 8

lm-eval finds models in its registry, so the class must be imported before lm-eval parses
``--model``: tools/lm_eval_prosec.py imports this module and hands the command line to lm-eval's
own CLI; in Python, ``import prosec_mcore.evaluation.lm_eval_adapter`` before
``lm_eval.simple_evaluate(model="prosec", ...)`` (or pass ``ProSeCoLM(...)`` as the model).

The three request types:

* ``generate_until``: the project's prompted samplers (``sampler=`` any of
  ``sampling.generate.SAMPLERS``, with their options), ``gen_length`` tokens after the prompt,
  the response ends at EOS and is cut at the request's ``until`` strings. The task's
  ``max_gen_toks`` and sampling options (``do_sample``, ``temperature``) are not used: the
  sampler and ``gen_length`` in ``--model_args`` decide (as LLaDA's harness does).
* ``loglikelihood``: LLaDA's Monte-Carlo ELBO (evaluation/elbo.py) with ``mc_num`` draws, a lower
  bound on log p(continuation | context); ``is_greedy`` with ``check_greedy=true``, else False.
* ``loglikelihood_rolling`` (perplexity tasks): the ELBO of the whole text from an empty context,
  one estimate per document (no rolling windows: the text must fit the model's length).

The options (prompted_model.ModelOptions) are checked before anything loads; a wrong one is one
line naming it. ``--batch_size`` and ``--device`` of lm-eval's command line apply when
``--model_args`` does not set them (``auto`` batch sizes are not supported: the default is used).
"""

from __future__ import annotations

import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .prompted_model import ModelOptions, PromptedModel

log = logging.getLogger(__name__)


def _merge(model_args: dict, additional: dict | None) -> dict:
    """model_args plus lm-eval's batch_size/device where model_args lacks them (lm-eval would pass
    both as keywords, a TypeError when a key is in both). Its command line always sends
    batch_size (default 1) and device (default cuda), so these are defaults, not orders."""
    merged = dict(model_args)
    for key, value in (additional or {}).items():
        if key == "max_batch_size" or value is None or key in merged:
            continue
        if key == "device" and str(value).startswith("cuda") and not _cuda_available():
            continue  # lm-eval's command line defaults to cuda; on a CPU-only machine run on the CPU
        if key == "batch_size" and not str(value).isdigit():
            log.warning("batch_size=%s is not supported by the prosec model; using batch_size=%d",
                        value, merged.get("batch_size", ModelOptions.batch_size))
            continue
        merged[key] = value
    return merged


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@register_model("prosec")
class ProSeCoLM(LM):
    """An lm-eval ``LM`` over :class:`prompted_model.PromptedModel` (module docstring)."""

    def __init__(self, options: ModelOptions | None = None, model: PromptedModel | None = None, **kwargs):
        super().__init__()
        if model is None:
            options = options or ModelOptions.from_dict(kwargs)
            model = PromptedModel(options)
        self.model = model
        self._rank, self._world_size = 0, 1

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ProSeCoLM":
        from lm_eval import utils

        return cls(ModelOptions.from_dict(_merge(utils.simple_parse_args_string(arg_string), additional_config)))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ProSeCoLM":
        return cls(ModelOptions.from_dict(_merge(arg_dict, additional_config)))

    @property
    def device(self):
        return self.model.options.device or "cpu"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.model.loglikelihoods([r.args[:2] for r in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args[:2], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [ll for ll, _ in self.model.loglikelihoods([("", r.args[0]) for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, until = [], []
        for r in requests:
            context, gen_kwargs = r.args[0], dict(r.args[1] or {})
            stops = gen_kwargs.get("until") or []
            prompts.append(context)
            until.append([stops] if isinstance(stops, str) else list(stops))
        texts = [g["text"] for g in self.model.generate(prompts, until)]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    # --- chat templates (--apply_chat_template) -------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return repr(self.model.tokenizer).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return chat_template if isinstance(chat_template, str) else getattr(
            getattr(self.model.tokenizer, "backend", None), "chat_template", None) or "prosec-default"

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text as SFT rendered it (data/chat_template.render_prompt: the tokenizer's own
        template, else the project's default), generation prompt included."""
        from ..data.chat_template import render_prompt

        if not add_generation_prompt:
            raise NotImplementedError("the prosec model renders chat prompts with the generation prompt only "
                                      "(no assistant prefill: drop gen_prefix from the task)")
        return render_prompt(chat_history, self.model.tokenizer)
