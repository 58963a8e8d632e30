"""Tokenizers for masked diffusion language models.

A masked diffusion LM corrupts a sequence by replacing tokens with a dedicated
``[MASK]`` symbol and learns to predict the originals.  The mask symbol must be a
real row of the embedding table, yet it must never occur in training data and
the model must never predict it.  Every tokenizer here therefore has::

    vocab_size == 1 + the largest id it knows, and 0 <= mask_id < vocab_size

Tokenizers built by this project append the mask as the *last* id.  Tokenizers
of pretrained models may place it anywhere: LLaDA-8B's ``<|mdm_mask|>`` is id
126336, not its last id, and its model has more embedding rows (126,464) than
the tokenizer has ids.  For those, name the special tokens
(``data.tokenizer.mask_token: "<|mdm_mask|>"``, and ``eod_token`` /
``pad_token``); the model's rows beyond ``vocab_size`` are padding that the
loss never predicts (``diffusion/losses.invalid_vocab_mask``).

Besides the mask we track ``eod`` (end of document, appended to every document
by the preprocessor) and ``pad``.  Raw text is always encoded with special
tokens *disabled*: the string ``"<|mask|>"`` inside a document becomes ordinary
bytes, so special ids only ever enter a sequence on purpose.

Three kinds are supported by :func:`build_tokenizer`:

* ``hf_json``  -- a HuggingFace ``tokenizers`` JSON file (or a folder with
  ``tokenizer.json``, e.g. a downloaded model).  By default ``<|endoftext|>``
  must be a special token and ``<|mask|>`` is appended if it is missing; with
  ``mask_token=`` / ``eod_token=`` / ``pad_token=`` the named tokens must exist
  (at any id) and are used as they are.
* ``gpt2_bpe`` -- GPT-2's byte-level BPE given as a tiktoken rank file
  (``gpt2.tiktoken``); converted to a ``tokenizers`` BPE, see ``gpt2_bpe.py``.
  eod = 50256, mask = 50257 (``pad`` aliases ``eod``: GPT-2 has no pad token).
* ``char``     -- one id per character (e.g. SMILES), then eod, pad, mask.
* ``auto``     -- a folder written by :meth:`ProSeCoTokenizer.save`.

The classes implement megatron-core's ``MegatronTokenizerBase`` interface
(``tokenize``/``detokenize``/``vocab``/``vocab_size``/``eod``/``pad`` and a
``unique_identifiers`` dict that feeds the dataset-cache hash), which is all
``GPTDatasetConfig``/``GPTDataset`` need.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
META_FILE = "prosec_tokenizer.json"  # written by save(); read by kind="auto"
CHAR_FILE = "char_vocab.json"
KINDS = ("hf_json", "gpt2_bpe", "char", "auto")


class ProSeCoTokenizer(MegatronTokenizerBase):
    """Common interface: ids for text plus the special ids eod, pad and mask.

    Subclasses implement ``encode``, ``decode``, ``vocab``, ``_save_files`` and
    ``_fingerprint``; this base class checks the special ids and provides the
    megatron-core aliases.
    """

    kind: str = "base"

    def __init__(self, path: Optional[str], vocab_size: int, eod: int, pad: int, mask: int):
        super().__init__(path or "", config={})
        self._vocab_size, self._eod, self._pad, self._mask = vocab_size, eod, pad, mask
        if not 0 <= mask < vocab_size:
            raise ValueError(f"the mask token has id {mask}, outside the vocabulary [0, {vocab_size})")
        if len({eod, mask}) != 2 or pad == mask:
            raise ValueError(f"special ids collide: eod={eod} pad={pad} mask={mask}")

    # --- the project's interface -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> str:
        """Write the tokenizer files plus a small metadata file into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self._save_files(directory)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod,
                "pad": self.pad, "mask": self.mask_id, **self._meta_extra()}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        return directory

    def _meta_extra(self) -> dict:
        return {}

    # --- megatron-core aliases -----------------------------------------------------------------
    @property
    def mask(self) -> int:
        return self._mask

    @property
    def eos(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pre-training tokenizers have no chat template")

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identity used by megatron-core to name cached dataset indices."""
        return OrderedDict(class_=type(self).__name__, kind=self.kind, vocab_size=self.vocab_size,
                           eod=self.eod, pad=self.pad, mask=self.mask_id,
                           fingerprint=self._fingerprint())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod}, pad={self.pad}, mask={self.mask_id})")


class HFTokenizer(ProSeCoTokenizer):
    """Wraps a ``tokenizers.Tokenizer`` (used by ``hf_json`` and ``gpt2_bpe``).

    Default special tokens: ``<|endoftext|>`` (must be special), ``<|pad|>`` (eod if absent),
    ``<|mask|>`` (appended as the last id if absent). Named tokens (``mask_token="<|mdm_mask|>"``)
    must already be in the vocabulary; they keep their ids and are made special if they are not,
    so that raw text never encodes to them.
    """

    def __init__(self, backend, path: Optional[str] = None, kind: str = "hf_json",
                 eod_token: Optional[str] = EOD_TOKEN, pad_token: Optional[str] = PAD_TOKEN,
                 mask_token: Optional[str] = None):
        self.kind = kind
        eod_token = eod_token or EOD_TOKEN
        added = backend.get_added_tokens_decoder()
        specials = {tok.content: i for i, tok in added.items() if tok.special}
        named = [t for t in (mask_token,) if t] + ([eod_token] if eod_token != EOD_TOKEN else []) + \
            ([pad_token] if pad_token and pad_token != PAD_TOKEN else [])
        for name in named:
            if backend.token_to_id(name) is None:
                raise ValueError(f"tokenizer {path or ''} has no token {name!r}; name one of its special tokens "
                                 f"(data.tokenizer.mask_token / eod_token / pad_token)")
        if eod_token not in specials and eod_token not in named:
            raise ValueError(
                f"tokenizer {path or ''} has no special token {eod_token!r}; retrain it with "
                f"special_tokens=[{eod_token!r}, {PAD_TOKEN!r}, ...] (see prepare_data.py), or name its "
                f"end-of-document token with data.tokenizer.eod_token."
            )
        if mask_token is None:
            mask_token = MASK_TOKEN
            if MASK_TOKEN not in specials:  # append the mask as the last id
                backend.add_special_tokens([MASK_TOKEN])
        from tokenizers import AddedToken

        # existing vocabulary entries: made special in place (their ids do not change)
        backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in named if n not in specials])
        backend.encode_special_tokens = True  # raw text never yields special ids
        self._tk = backend
        eod = backend.token_to_id(eod_token)
        pad_id = backend.token_to_id(pad_token) if pad_token else None
        self._names = {"eod_token": eod_token, "pad_token": pad_token if pad_id is not None else eod_token,
                       "mask_token": mask_token}
        # 1 + the largest id (equals the count when ids are contiguous, which they need not be)
        size = max(backend.get_vocab_size(with_added_tokens=True),
                   max(backend.get_vocab(with_added_tokens=True).values()) + 1)
        super().__init__(path, size, eod, eod if pad_id is None else pad_id, backend.token_to_id(mask_token))

    def _meta_extra(self) -> dict:
        return dict(self._names)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which we never use
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of text in which special tokens are *written as their strings* on purpose: a chat
        template's output (``<|startoftext|>...<|eot_id|>``, data/chat_template.py). Unlike
        :meth:`encode`, the strings of special tokens become their ids, as transformers'
        ``apply_chat_template`` tokenizes. A copy of the backend does this, so :meth:`encode` keeps
        reading raw text as text in every thread."""
        if not hasattr(self, "_chat_tk"):
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(self._tk.to_str())
            copy.encode_special_tokens = False
            self._chat_tk = copy
        return self._chat_tk.encode(text, add_special_tokens=False).ids

    @property
    def vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    def _save_files(self, directory: str) -> None:
        self._tk.save(os.path.join(directory, "tokenizer.json"))

    def _fingerprint(self) -> str:
        if not hasattr(self, "_fp"):
            self._fp = hashlib.sha256(self._tk.to_str().encode()).hexdigest()[:16]
        return self._fp


class CharTokenizer(ProSeCoTokenizer):
    """One id per character, followed by eod, pad and mask (mask last)."""

    kind = "char"

    def __init__(self, chars: str, path: Optional[str] = None):
        ordered = list(dict.fromkeys(chars))  # unique, in order of first appearance
        if not ordered:
            raise ValueError("char tokenizer needs at least one character")
        self._chars = ordered
        self._to_id = {c: i for i, c in enumerate(ordered)}
        n = len(ordered)
        self._specials = {n: EOD_TOKEN, n + 1: PAD_TOKEN, n + 2: MASK_TOKEN}
        super().__init__(path, n + 3, eod=n, pad=n + 1, mask=n + 2)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self._to_id})
            raise ValueError(
                f"characters {unknown[:10]!r} are not in the char vocabulary; add them to the "
                f"vocabulary file and re-run preprocessing"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self._chars)
        return "".join(self._chars[i] if i < n else self._specials[i] for i in map(int, ids))

    @property
    def vocab(self) -> dict[str, int]:
        v = dict(self._to_id)
        v.update({t: i for i, t in self._specials.items()})
        return v

    def _save_files(self, directory: str) -> None:
        with open(os.path.join(directory, CHAR_FILE), "w") as f:
            json.dump({"chars": self._chars}, f, ensure_ascii=False, indent=0)

    def _fingerprint(self) -> str:
        return hashlib.sha256("".join(self._chars).encode()).hexdigest()[:16]


def _require_file(path: Optional[str], what: str, hint: str) -> str:
    if not path:
        raise ValueError(f"a path to {what} is required. {hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}. {hint}")
    return path


def _load_char_vocab(path: str) -> str:
    """A saved ``char_vocab.json`` or a plain text file listing the characters (newlines are
    ignored, so one may write one character per line or all on one line)."""
    if path.endswith(".json"):
        with open(path) as f:
            return "".join(json.load(f)["chars"])
    with open(path, encoding="utf-8") as f:
        return f.read().replace("\r", "").replace("\n", "")


def build_tokenizer(kind: str, path: Optional[str] = None, *, chars: Optional[str] = None,
                    mask_token: Optional[str] = None, eod_token: Optional[str] = None,
                    pad_token: Optional[str] = None) -> ProSeCoTokenizer:
    """Build a tokenizer of ``kind`` (one of :data:`KINDS`) from ``path``.

    ``path`` may be a file or a folder (one written by :meth:`ProSeCoTokenizer.save`, or a
    Hugging Face model folder holding ``tokenizer.json``).  For ``kind="char"`` the characters
    may also be given directly via ``chars``.  ``mask_token``/``eod_token``/``pad_token`` name
    the special tokens of an ``hf_json`` tokenizer (None: the project's defaults).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    names = {"mask_token": mask_token, "eod_token": eod_token, "pad_token": pad_token}
    if path and os.path.isdir(path):
        meta_path = os.path.join(path, META_FILE)
        if kind == "auto":
            _require_file(meta_path, "tokenizer metadata",
                          "Write the folder with tokenizer.save().")
            with open(meta_path) as f:
                meta = json.load(f)
            kind = "hf_json" if meta["kind"] == "gpt2_bpe" else meta["kind"]  # saved as tokenizer.json
            names = {k: names[k] or meta.get(k) for k in names}  # names saved by HFTokenizer
        path = os.path.join(path, CHAR_FILE if kind == "char" else "tokenizer.json")
    elif kind == "auto":
        raise ValueError(f"kind='auto' needs a folder written by tokenizer.save(), got {path!r}")

    if kind != "hf_json" and any(names.values()):
        raise ValueError(f"special token names (mask_token/eod_token/pad_token) apply to hf_json tokenizers, "
                         f"not {kind!r}: the {kind} tokenizer defines its own special ids")
    if kind == "char":
        if chars is None:
            path = _require_file(path, "char vocabulary file",
                                 "Pass a text file containing every character, or chars='...'.")
            chars = _load_char_vocab(path)
        return CharTokenizer(chars, path)

    from tokenizers import Tokenizer

    if kind == "hf_json":
        path = _require_file(path, "tokenizer JSON file",
                             "Create one with `python tools/prepare_data.py` "
                             "(writes data_cache/shakespeare/tokenizer.json).")
        return HFTokenizer(Tokenizer.from_file(path), path, eod_token=names["eod_token"] or EOD_TOKEN,
                           pad_token=names["pad_token"] or PAD_TOKEN, mask_token=names["mask_token"])

    from prosec_mcore.data.gpt2_bpe import tokenizer_from_tiktoken_file

    path = _require_file(path, "GPT-2 rank file (gpt2.tiktoken)",
                         "Provide the tiktoken-format file with lines '<base64 token> <rank>'.")
    return HFTokenizer(tokenizer_from_tiktoken_file(path), path, kind="gpt2_bpe", pad_token=None)
