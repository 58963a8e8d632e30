"""Prompts from a JSON-lines file, rendered as the SFT data rendered them.

A record is an SFT record (data/chat_template.py: ``{"prompt", "response"}`` or ``{"messages"}``)
whose answer may be missing: ``{"prompt": str}`` alone, or ``messages`` that do not end with an
assistant turn. The prompt is the conversation before the answer, rendered with the chat template
and its generation prompt and tokenized exactly as ``tools/preprocess_data.py --sft`` did
(``chat_template.encode_prompt``), so a fine-tuned model sees at sampling time the text it saw in
training. Optional fields travel along: ``answer`` (the exact answer, for the benchmark's exact
match) and anything a checker wants to read (e.g. a Sudoku puzzle).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from ..cli_errors import UserInputError, iter_jsonl

HINT = 'a prompt record is {"prompt": str} or {"messages": [{"role": str, "content": str}, ...]}'


@dataclass
class PromptRecord:
    messages: list          # the conversation before the answer
    text: str               # the rendered prompt
    ids: list               # its token ids
    record: dict            # the JSON record as read (answer, checker fields)
    where: str              # "file line N", for messages about it

    @property
    def answer(self) -> Optional[str]:
        return self.record.get("answer")


def prompt_messages(record: dict, where: str) -> list:
    """The messages before the answer of ``record``, split as the SFT data splits a record (the
    answer, if any, dropped)."""
    from ..data.chat_template import split_example

    record = dict(record)  # extra fields (answer, a checker's) are ignored by split_example
    if "prompt" in record and "response" not in record:
        record["response"] = ""
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") != "assistant":
        record["messages"] = messages + [{"role": "assistant", "content": ""}]
    return split_example(record, where)[0]


def read_prompt_records(path: str, limit: Optional[int] = None) -> list[tuple[str, dict, list]]:
    """(where, record, messages) for the records of ``path`` (the first ``limit``): every record
    checked before any model is loaded, a bad one named in one line."""
    out = []
    for lineno, record in iter_jsonl(path, hint=HINT):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path} line {lineno}"
        out.append((where, record, prompt_messages(record, where)))
    if not out:
        raise UserInputError(f"{path} holds no prompt record; {HINT}")
    return out


def render_prompts(records: list, tokenizer, template="auto") -> list[PromptRecord]:
    """Rendered and tokenized prompts (``template``: data/chat_template.py's names or a file)."""
    from ..data.chat_template import encode_prompt, render_prompt, resolve_template

    resolved = resolve_template(template, tokenizer)
    return [PromptRecord(messages, render_prompt(messages, tokenizer, resolved),
                         encode_prompt(messages, tokenizer, resolved), record, where)
            for where, record, messages in records]


def load_checker(path: str) -> Callable:
    """``check(response: str, record: dict)`` from the Python file ``path``: True (or a score of
    1) when ``response`` solves the record's task; a score in [0, 1] may grade partial answers."""
    if not os.path.isfile(path):
        raise UserInputError(f"--checker {path} not found: give a Python file defining check(response, record)")
    spec = importlib.util.spec_from_file_location("prosec_prompt_checker", path)
    module = importlib.util.module_from_spec(spec)
    # registered before it runs, as an import would: a dataclass in the file looks its module up there
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    check = getattr(module, "check", None)
    if not callable(check):
        raise UserInputError(f"--checker {path} defines no function check(response, record)")
    return check


def response_rows(prompts: list, results: list, tokenizer) -> list[dict]:
    """The JSON lines of a prompted run: per prompt its text, the decoded response and its NFE."""
    return [{"index": i, "prompt": p.text, "response": tokenizer.decode(r["ids"]), "response_tokens": len(r["ids"]),
             "nfe": r["nfe"], "nfe_unmask": r["nfe_unmask"], "nfe_correct": r["nfe_correct"], "batch": r["batch"]}
            for i, (p, r) in enumerate(zip(prompts, results))]


def summarize(results: list, seconds: float, gen_length: int) -> dict:
    """NFE per prompt (mean), per batch (the network passes of each batch, mean) and throughput:
    response tokens (up to each EOS) per second, and generated positions (prompts x gen_length,
    the EOS after a response included) per second."""
    n = max(len(results), 1)
    batches = {r["batch"]: r["batch_nfe"] for r in results}
    tokens = sum(len(r["ids"]) for r in results)
    return {"prompts": len(results), "batches": len(batches), "response_tokens": tokens,
            "nfe_per_prompt": sum(r["nfe"] for r in results) / n,
            "nfe_unmask_per_prompt": sum(r["nfe_unmask"] for r in results) / n,
            "nfe_correct_per_prompt": sum(r["nfe_correct"] for r in results) / n,
            "nfe_per_batch": sum(batches.values()) / max(len(batches), 1),
            "seconds": round(seconds, 3), "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "positions_per_second": len(results) * gen_length / seconds if seconds > 0 else None}
