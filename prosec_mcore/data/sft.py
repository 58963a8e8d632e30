"""Supervised fine-tuning data: one (prompt, response) example per sample, with per-token roles.

Layout (LLaDA's SFT)
--------------------
Every example becomes exactly ``seq_length`` tokens::

    prompt ids | response ids | EOS | EOS EOS ... EOS
    role 1       role 0         0     role 2 (padding)

The prompt is the chat template's rendering of the turns before the answer, generation prompt
included (data/chat_template.py); the response is what the template writes for the answer; the
EOS (``tokenizer.eod``) that ends it belongs to the response, and the EOS ids that pad the sample
to ``seq_length`` are padding. During SFT the prompt is never masked and never in the loss; the
response is masked by the schedule; whether padding counts in the loss is
``objective.sft_pad_in_loss`` (LLaDA: it does, so the model learns to end its answers).

Overlong examples (``overlong``): an example needs ``P + R + 1`` tokens (prompt, response, EOS).

* ``refuse`` (default): the first example longer than ``seq_length`` stops the writer with one
  line naming its file and line, its length and the fixes;
* ``truncate``: the prompt keeps its *last* ``min(P, seq_length - 1)`` tokens (it is cut from the
  start only when it alone leaves no room for one response token), and the response keeps its
  *first* tokens in the room left. The EOS is kept only when the whole response fits, so a cut
  response has no EOS (the model is not taught to stop where the cut fell) and no padding; every
  sample keeps at least one response token. The counts of cut examples and tokens are reported.

On disk
-------
``<prefix>.bin/.idx``: a megatron indexed dataset of the tokens, one document per example, each
exactly ``seq_length`` tokens; ``<prefix>_roles.bin/.idx``: a second one, uint8, one role per
token (0 response, 1 prompt, 2 padding) with identical document lengths; ``<prefix>_sft.json``:
sequence length, counts, the template used and the tokenizer's fingerprint, written last (its
presence means the files are complete). Both datasets are written by megatron-core's
``IndexedDatasetBuilder``, as the pre-training preprocessor writes its own.

Reading
-------
:class:`SFTDataset` answers ``source[i]`` for *any* global sample index ``i`` (``endless``): sample
``i`` is example ``perm_e[i mod n]`` of the split's ``n`` examples, where epoch ``e = i // n`` has
its own permutation drawn from ``(seed, e)``. So the sample is a pure function of ``(seed, i)``
and a resumed run needs only the iteration, as everywhere in the data layer (docs/data.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from typing import Iterable

import numpy as np
import torch

from ..cli_errors import UserInputError
from .chat_template import (
    ChatTemplate,
    encode_rendered,
    render_prompt,
    render_response,
    resolve_template,
    special_token_strings,
    split_example,
)

ROLE_RESPONSE, ROLE_PROMPT, ROLE_PAD = 0, 1, 2
OVERLONG_POLICIES = ("refuse", "truncate")
FORMAT = "prosec-sft"
VERSION = 1
WRITE_HINT = "write it with tools/preprocess_data.py --sft"
_EPOCH_CACHE = 4  # permutations kept per dataset (neighbouring epochs meet at a batch boundary)


def roles_prefix(prefix: str) -> str:
    return prefix + "_roles"


def metadata_path(prefix: str) -> str:
    return prefix + "_sft.json"


# --- one example ---------------------------------------------------------------------------------

def tokenize_example(messages: list[dict], response: str, tokenizer, template: ChatTemplate,
                     where: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids without the EOS) of one example. With a template that writes
    control tokens as text, a text holding a special-token string is refused: it would be read as
    that control token (transformers' ``apply_chat_template`` has the same hazard)."""
    if template.control_tokens:
        specials = special_token_strings(tokenizer)
        for i, text in enumerate([m["content"] for m in messages] + [response]):
            found = next((s for s in specials if s in text), None)
            if found is not None:
                part = "the response" if i == len(messages) else f"message {i}"
                raise UserInputError(f"{where}: {part} contains the special token {found!r}, which the chat "
                                     f"template's encoding would read as a control token; remove it from the text")
    try:
        prompt = encode_rendered(render_prompt(messages, tokenizer, template), tokenizer, template)
        answer = encode_rendered(render_response(response, tokenizer, template, messages), tokenizer, template)
    except ValueError as err:  # a char vocabulary without some character
        if isinstance(err, UserInputError):
            raise
        raise UserInputError(f"{where}: {err}") from None
    return prompt, answer


def layout_example(prompt: list[int], response: list[int], eos_id: int, seq_length: int,
                   overlong: str = "refuse", where: str = "") -> tuple[np.ndarray, np.ndarray, int, int]:
    """(tokens int64 [L], roles uint8 [L], prompt tokens cut, response tokens cut) of one example
    in the SFT layout (module docstring; ``response`` without its EOS). An example longer than
    ``seq_length`` is refused (one line) or truncated by the stated rule."""
    L, P, R = seq_length, len(prompt), len(response)
    body = list(response) + [eos_id]  # the EOS ends the response and belongs to it
    cut_prompt = cut_response = 0
    if P + R + 1 > L:
        if overlong != "truncate":
            raise UserInputError(f"{where}: the example is {P + R + 1} tokens (prompt {P} + response {R} + EOS), "
                                 f"longer than --seq-length {L}; raise --seq-length, shorten the example, or pass "
                                 f"--overlong truncate")
        keep_prompt = min(P, L - 1)
        cut_prompt = P - keep_prompt
        prompt = prompt[P - keep_prompt:]
        room = L - keep_prompt
        cut_response = len(body) - room  # tokens of the response (the EOS counted) that do not fit
        body = body[:room]
    tokens = np.full(L, eos_id, dtype=np.int64)
    roles = np.full(L, ROLE_PAD, dtype=np.uint8)
    n_p, n_r = len(prompt), len(body)
    tokens[:n_p], roles[:n_p] = prompt, ROLE_PROMPT
    tokens[n_p:n_p + n_r], roles[n_p:n_p + n_r] = body, ROLE_RESPONSE
    return tokens, roles, cut_prompt, cut_response


def iter_sft_records(paths: Iterable[str]):
    """``(where, record)`` for every line of every JSON-lines file (``where`` = ``"<file> line
    <n>"``); a line that is not a JSON object is refused in one line (cli_errors.iter_jsonl)."""
    from ..cli_errors import iter_jsonl

    for path in paths:
        for lineno, record in iter_jsonl(path, hint="an SFT input holds one example per line"):
            yield f"{path} line {lineno}", record


def _check_template_alphabet(template: ChatTemplate, tokenizer) -> None:
    """The default template's markup must be encodable (a char vocabulary may lack '<', '|' ...)."""
    if template.name != "default":
        return
    probe = [{"role": r, "content": ""} for r in ("system", "user", "assistant")]
    try:
        tokenizer.encode(render_prompt(probe, tokenizer, template))
    except ValueError as err:
        raise UserInputError(f"the default chat template writes text the tokenizer cannot encode ({err}); pass "
                             f"--chat-template none (the prompt as it is) or a .jinja template of its "
                             f"alphabet") from None


def tokenizer_identity(tokenizer) -> dict:
    """What the SFT metadata records of the tokenizer (megatron's unique_identifiers)."""
    ids = getattr(tokenizer, "unique_identifiers", None)
    if ids is None:
        return {"vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)}
    return {key: (value if isinstance(value, (int, str)) else str(value)) for key, value in dict(ids).items()}


# --- writing -------------------------------------------------------------------------------------

def write_sft_dataset(records: Iterable, tokenizer, prefix: str, seq_length: int, template="auto",
                      overlong: str = "refuse", show_progress: bool = False) -> dict:
    """Write ``<prefix>.bin/.idx``, ``<prefix>_roles.bin/.idx`` and ``<prefix>_sft.json`` from
    ``records``: dicts (a record of chat_template.split_example), or ``(where, dict)`` pairs whose
    ``where`` names the record in error messages (``iter_sft_records`` yields them). ``template``:
    ``auto`` | ``default`` | ``none`` | a ``.jinja`` path | a ChatTemplate; ``overlong``:
    ``refuse`` | ``truncate`` (module docstring). Returns the statistics also stored in the
    metadata. Bad input raises a one-line UserInputError; nothing is left behind on failure."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    from .preprocess import token_dtype

    if overlong not in OVERLONG_POLICIES:
        raise UserInputError(f"overlong={overlong!r}: choose one of {', '.join(OVERLONG_POLICIES)}")
    if not isinstance(seq_length, int) or seq_length < 2:
        raise UserInputError(f"--seq-length {seq_length}: an SFT sample needs at least 2 tokens (a prompt token "
                             f"and a response token)")
    chat = resolve_template(template, tokenizer)
    _check_template_alphabet(chat, tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f".tmp{os.getpid()}"
    paths = {name: (p + tmp + ".bin", p + tmp + ".idx", p + ".bin", p + ".idx")
             for name, p in (("tokens", prefix), ("roles", roles_prefix(prefix)))}
    dtype = token_dtype(tokenizer.vocab_size)
    builders = {"tokens": IndexedDatasetBuilder(paths["tokens"][0], dtype=dtype),
                "roles": IndexedDatasetBuilder(paths["roles"][0], dtype=np.uint8)}
    counts = dict.fromkeys(("examples", "prompt_tokens", "response_tokens", "pad_tokens", "truncated",
                            "cut_prompt_tokens", "cut_response_tokens", "longest_example"), 0)
    start = time.time()
    try:
        for n, item in enumerate(tqdm(records, unit="example", desc="tokenizing", disable=not show_progress)):
            where, record = item if isinstance(item, tuple) else (f"record {n}", item)
            messages, response = split_example(record, where)
            prompt, answer = tokenize_example(messages, response, tokenizer, chat, where)
            tokens, roles, cut_p, cut_r = layout_example(prompt, answer, tokenizer.eod, seq_length, overlong, where)
            builders["tokens"].add_document(tokens.astype(dtype), [seq_length])
            builders["roles"].add_document(roles, [seq_length])
            counts["examples"] += 1
            counts["longest_example"] = max(counts["longest_example"], len(prompt) + len(answer) + 1)
            for role, key in ((ROLE_PROMPT, "prompt_tokens"), (ROLE_RESPONSE, "response_tokens"),
                              (ROLE_PAD, "pad_tokens")):
                counts[key] += int((roles == role).sum())
            counts["truncated"] += bool(cut_p or cut_r)
            counts["cut_prompt_tokens"] += cut_p
            counts["cut_response_tokens"] += cut_r
        if counts["examples"] == 0:
            raise UserInputError("the SFT input holds no examples (only blank lines?)")
        for name, builder in builders.items():
            builder.finalize(paths[name][1])
    except BaseException:
        for name, builder in builders.items():
            builder.data_file.close()
            for path in paths[name][:2]:
                if os.path.exists(path):
                    os.remove(path)
        raise
    for tmp_bin, tmp_idx, out_bin, out_idx in paths.values():
        os.replace(tmp_bin, out_bin)
        os.replace(tmp_idx, out_idx)
    stats = {"format": FORMAT, "version": VERSION, "seq_length": seq_length, **counts,
             "tokens": counts["examples"] * seq_length, "overlong": overlong, "eos_id": int(tokenizer.eod),
             "dtype": np.dtype(dtype).name, "template": chat.describe(), "tokenizer": tokenizer_identity(tokenizer)}
    meta = metadata_path(prefix)
    with open(meta + tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(meta + tmp, meta)
    return {**stats, "seconds": round(time.time() - start, 3),
            "files": [p for t in paths.values() for p in t[2:]] + [meta]}


def describe_sft_stats(stats: dict) -> list[str]:
    """Lines saying what :func:`write_sft_dataset` wrote (the preprocessing tool prints them)."""
    tokens, template = stats["tokens"], stats["template"]
    return [
        f"chat template: {template['name']}" + (f" (sha256 {template['sha256']})" if template["sha256"] else ""),
        f"examples:  {stats['examples']:,} samples of {stats['seq_length']} tokens = {tokens:,} tokens, dtype "
        f"{stats['dtype']}; longest example {stats['longest_example']:,} tokens (prompt + response + EOS)",
        f"roles:     prompt {stats['prompt_tokens'] / tokens:.1%}, response with its EOS "
        f"{stats['response_tokens'] / tokens:.1%}, EOS padding {stats['pad_tokens'] / tokens:.1%}",
        f"overlong:  {stats['overlong']}; {stats['truncated']:,} example(s) truncated ({stats['cut_prompt_tokens']:,} "
        f"prompt and {stats['cut_response_tokens']:,} response tokens cut)",
    ]


# --- reading -------------------------------------------------------------------------------------

def _check_pair(prefix: str, what: str):
    """An indexed dataset's files, checked cheaply (data/datasets.py), opened; errors as ValueError."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from .datasets import check_indexed_dataset_files

    try:
        info = check_indexed_dataset_files(prefix)
    except FileNotFoundError:
        raise ValueError(f"{prefix}.bin/.idx not found ({what}); re-create the SFT dataset with "
                         f"tools/preprocess_data.py --sft") from None
    if info["sequences"] == 0:
        raise ValueError(f"{prefix}.bin/.idx holds no examples; {WRITE_HINT}")
    return IndexedDataset(prefix, mmap=True)


def read_sft_metadata(prefix: str) -> dict:
    """``<prefix>_sft.json``, or a one-line ValueError saying the prefix is no SFT dataset."""
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        hint = (" (it is a pre-training corpus: set data.format=text)" if os.path.isfile(prefix + ".idx") else "")
        raise ValueError(f"{path} not found: {prefix} is not an SFT dataset{hint}; {WRITE_HINT}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON (an interrupted copy?); {WRITE_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("seq_length"), int):
        raise ValueError(f"{path} is not the metadata of tools/preprocess_data.py --sft; {WRITE_HINT}")
    return meta


def open_sft_files(prefix: str, seq_length: int, tokenizer=None):
    """(metadata, tokens IndexedDataset, roles IndexedDataset) of an SFT dataset, after checking
    (one-line ValueError each): the metadata, both file pairs, equal example counts, every
    document exactly ``seq_length`` tokens in both, uint8 roles, and (with ``tokenizer``) the
    tokenizer the data was written with."""
    meta = read_sft_metadata(prefix)
    if meta["seq_length"] != seq_length:
        raise ValueError(f"{prefix} holds SFT samples of {meta['seq_length']} tokens but data.seq_length="
                         f"{seq_length}; set data.seq_length={meta['seq_length']} or re-run "
                         f"tools/preprocess_data.py --sft --seq-length {seq_length}")
    tokens = _check_pair(prefix, "the tokens")
    roles = _check_pair(roles_prefix(prefix), "the per-token roles of the SFT dataset")
    if roles.index.dtype != np.uint8:
        raise ValueError(f"{roles_prefix(prefix)}.idx holds {np.dtype(roles.index.dtype).name} values, not uint8 "
                         f"roles; {WRITE_HINT}")
    n_tok, n_rol = len(tokens.sequence_lengths), len(roles.sequence_lengths)
    if not n_tok == n_rol == meta.get("examples"):
        raise ValueError(f"{prefix}: {n_tok} token documents, {n_rol} role documents and {meta.get('examples')} "
                         f"examples in {metadata_path(prefix)} (files of different runs?); {WRITE_HINT}")
    for name, ds in ((prefix, tokens), (roles_prefix(prefix), roles)):
        bad = np.flatnonzero(ds.sequence_lengths != seq_length)
        if bad.size:
            raise ValueError(f"{name}.idx: document {bad[0]} has {ds.sequence_lengths[bad[0]]} tokens, not "
                             f"seq_length={seq_length} ({bad.size} such documents; not written by --sft?); "
                             f"{WRITE_HINT}")
    if tokenizer is not None:
        saved, ours = meta.get("tokenizer", {}), tokenizer_identity(tokenizer)
        if saved != ours:
            diff = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
            raise ValueError(f"{prefix} was tokenized with another tokenizer than the run's (differs in "
                             f"{', '.join(diff)}); use the tokenizer it was written with (data.tokenizer.*) or "
                             f"re-run tools/preprocess_data.py --sft with this one")
    return meta, tokens, roles


def split_examples(n: int, split: str) -> list[np.ndarray]:
    """Example indices of train, valid and test for ``n`` examples and a ``data.split`` string:
    megatron's shares and rounding (as for documents, data/shards.py) applied to a fixed
    permutation of the examples, so that a JSONL ordered by topic or difficulty still gives
    representative splits. The permutation depends on ``n`` only (seed 0), not on train.seed:
    runs with different training seeds train and validate on the same examples."""
    from .shards import split_document_ranges

    order = np.random.default_rng(np.random.SeedSequence([0, n])).permutation(n)
    return [np.sort(order[begin:end]) for begin, end in split_document_ranges(split, n)]


class SFTDataset:
    """The samples of an SFT dataset's split (module docstring): ``source[i]`` for any ``i >= 0``
    returns ``{"tokens": LongTensor [L], "prompt_mask": BoolTensor [L], "pad_mask": BoolTensor [L]}``
    (prompt_mask: role prompt; pad_mask: the EOS padding after the response's own EOS).

    ``indices``: the dataset's example ids of this split (None: all); ``seed``: the order's seed
    (train.seed); ``tokenizer``: checked against the one the data was written with."""

    endless = True

    def __init__(self, prefix: str, seq_length: int, indices=None, seed: int = 0, tokenizer=None):
        self.prefix, self.seq_length, self.seed = prefix, seq_length, seed
        self.metadata, self._tokens, self._roles = open_sft_files(prefix, seq_length, tokenizer)
        total = len(self._tokens.sequence_lengths)
        self.indices = self._checked(np.arange(total) if indices is None else indices)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _checked(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        total = len(self._tokens.sequence_lengths)
        if indices.ndim != 1 or not len(indices) or indices.min() < 0 or indices.max() >= total:
            raise ValueError(f"a split of {self.prefix} needs example ids in [0, {total}), at least one")
        return indices

    def subset(self, indices) -> "SFTDataset":
        """The same files (opened once) restricted to the example ids ``indices``, e.g. a split."""
        import copy

        part = copy.copy(self)
        part.indices, part._perms = self._checked(indices), OrderedDict()
        return part

    def __len__(self) -> int:
        """Examples in the split (one epoch); every index ``i >= 0`` is valid."""
        return len(self.indices)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the split's examples in ``epoch``: a pure function of (seed, epoch)."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            perm = rng.permutation(len(self.indices))
            self._perms[epoch] = perm
            while len(self._perms) > _EPOCH_CACHE:
                self._perms.popitem(last=False)
        return perm

    def example_index(self, i: int) -> int:
        """The dataset example (document) that global sample ``i`` reads."""
        if i < 0:
            raise IndexError(f"sample index {i} < 0")
        epoch, position = divmod(int(i), len(self.indices))
        return int(self.indices[self.permutation(epoch)[position]])

    def __getitem__(self, i: int) -> dict:
        doc = self.example_index(i)
        roles = torch.from_numpy(np.asarray(self._roles[doc]).astype(np.int64))
        return {"tokens": torch.from_numpy(np.asarray(self._tokens[doc]).astype(np.int64)),
                "prompt_mask": roles == ROLE_PROMPT, "pad_mask": roles == ROLE_PAD}

    def fingerprint(self) -> dict:
        """What a checkpoint's data identity records: the files' metadata hash and the split size."""
        with open(metadata_path(self.prefix), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return {"prefix": self.prefix, "metadata_sha256": digest, "examples": len(self.indices)}
