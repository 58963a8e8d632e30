"""The project's own evaluation of prompted tasks, without lm-eval: two JSON-lines formats.

* **generation** items ``{"prompt": str, "answer": str}``: the model responds to ``prompt``
  (prompted_model.PromptedModel.generate, cut at the ``until`` strings); the item is solved when
  the response equals ``answer`` exactly (``exact_match``, the strict string equality of
  lm-eval's ``exact_match`` with no options).
* **choice** items ``{"prompt": str, "choices": [str, ...], "gold": int}``: each choice is scored by
  the ELBO of ``delimiter + choice`` after ``prompt`` (lm-eval's multiple-choice requests, whose
  ``target_delimiter`` is " " by default); the item is right when the first highest-scoring
  choice is the gold one (``acc``); ``acc_norm`` divides each score by the choice's length in
  characters first (lm-eval's definitions).

Both return the per-item results beside the mean, so a disagreement can be traced to an item.
"""

from __future__ import annotations

from typing import Sequence

from ..cli_errors import UserInputError, iter_jsonl

GENERATION_HINT = 'each line: {"prompt": "...", "answer": "..."}'
CHOICE_HINT = 'each line: {"prompt": "...", "choices": ["...", "..."], "gold": <index of the right choice>}'


def read_generation_items(path: str) -> list[dict]:
    items = []
    for lineno, record in iter_jsonl(path, hint=GENERATION_HINT):
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("answer"), str):
            raise UserInputError(f"{path} line {lineno}: needs string 'prompt' and 'answer'; {GENERATION_HINT}")
        items.append(record)
    if not items:
        raise UserInputError(f"{path} holds no items; {GENERATION_HINT}")
    return items


def read_choice_items(path: str) -> list[dict]:
    items = []
    for lineno, record in iter_jsonl(path, hint=CHOICE_HINT):
        choices, gold = record.get("choices"), record.get("gold")
        if (not isinstance(record.get("prompt"), str) or not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) for c in choices)):
            raise UserInputError(f"{path} line {lineno}: needs a string 'prompt' and a list of string 'choices'; "
                                 f"{CHOICE_HINT}")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise UserInputError(f"{path} line {lineno}: 'gold' must be an index into its {len(choices)} choices")
        items.append(record)
    if not items:
        raise UserInputError(f"{path} holds no items; {CHOICE_HINT}")
    return items


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy.argmax


def evaluate_generation(model, items: Sequence[dict], until: Sequence[str] = ()) -> dict:
    """exact_match over generation items, with each item's response and NFE."""
    responses = model.generate([it["prompt"] for it in items], [list(until)] * len(items))
    rows = [{"response": r["text"], "answer": it["answer"], "exact_match": float(r["text"] == it["answer"]),
             "nfe": r["nfe"]} for it, r in zip(items, responses)]
    return {"exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "nfe_mean": sum(r["nfe"] for r in rows) / len(rows), "items": rows}


def evaluate_choices(model, items: Sequence[dict], delimiter: str = " ") -> dict:
    """acc and acc_norm over choice items, with each item's log-likelihoods and prediction."""
    pairs = [(it["prompt"], delimiter + c) for it in items for c in it["choices"]]
    scores = iter(model.loglikelihoods(pairs))
    rows = []
    for it in items:
        lls = [next(scores)[0] for _ in it["choices"]]
        pred = _first_argmax(lls)
        pred_norm = _first_argmax([ll / len(c) for ll, c in zip(lls, it["choices"])])
        rows.append({"loglikelihoods": lls, "pred": pred, "gold": it["gold"], "acc": float(pred == it["gold"]),
                     "acc_norm": float(pred_norm == it["gold"])})
    return {"acc": sum(r["acc"] for r in rows) / len(rows), "acc_norm": sum(r["acc_norm"] for r in rows) / len(rows),
            "items": rows}
