"""GPT-2 byte-level BPE from a tiktoken rank file, without the ``tiktoken`` package.

A tiktoken rank file (``gpt2.tiktoken``) has one line per token::

    <base64 of the token's bytes> <rank>

The rank is both the token id and the merge priority: to encode a word, start
from single bytes and repeatedly join the adjacent pair whose concatenation has
the lowest rank, until no adjacent pair forms a known token.

HuggingFace ``tokenizers`` instead describes BPE by an ordered list of *merge
rules* ``(left, right)``.  We recover the rule that created each token ``T``
the same way BPE training produced it: run the rank-based algorithm on the
bytes of ``T`` using only tokens of lower rank than ``T``.  For a vocabulary
made by BPE training this stops at exactly two pieces ``(left, right)``, and
ordering the rules by ``rank(T)`` reproduces tiktoken's encoding.

``tokenizers`` stores byte-level tokens as printable unicode strings (GPT-2's
"bytes to unicode" table: printable bytes map to themselves, the others to
code points from 256 upwards), so every byte string is converted with that
table.  The GPT-2 pre-tokenizer regex is the default of ``ByteLevel``.  Finally
``<|endoftext|>`` is added as the next id (50256 for GPT-2); the mask token is
appended after it by :class:`prosec_mcore.data.tokenizer.HFTokenizer`.
"""

from __future__ import annotations

import base64

EOD_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # non-printable bytes are shifted to unused code points 256, 257, ...
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse ``<base64 token> <rank>`` lines; ranks must be 0..n-1 without gaps."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the integers 0..{len(ranks) - 1} exactly once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte-level BPE needs all 256 single bytes; "
                         f"missing {missing[:8]}")
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Rank-based BPE on ``token`` using only tokens ranked below ``token`` itself."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge rule per multi-byte token, ordered by the rank of the merged token."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split_by_lower_ranks(token, ranks)
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {ranks[token]}) cannot be built from two lower-ranked "
                f"tokens; the rank file is not a BPE vocabulary"
            )
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_from_ranks(ranks: dict[bytes, int], eod_token: str = EOD_TOKEN):
    """Build a ``tokenizers.Tokenizer`` equivalent to the tiktoken ranks, plus the eod token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()

    def as_unicode(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {as_unicode(tok): rank for tok, rank in ranks.items()}
    merges = [(as_unicode(a), as_unicode(b)) for a, b in derive_merges(ranks)]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(eod_token, special=True, normalized=False)])
    return tk


def tokenizer_from_tiktoken_file(path: str, eod_token: str = EOD_TOKEN):
    """Read ``path`` (``gpt2.tiktoken`` format) and convert it; see the module docstring."""
    return tokenizer_from_ranks(read_tiktoken_ranks(path), eod_token)


WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"


def fetch_gpt2_tiktoken(out_dir: str) -> str:
    """Put GPT-2's rank file at <out_dir>/gpt2.tiktoken and return its path.

    The file ships inside the source distribution of `openai-whisper` on PyPI (identical to
    tiktoken's r50k_base); pip downloads the sdist (~0.8 MB, nothing installed) and the one
    file is extracted. Does nothing if the file is already there.
    """
    import glob
    import os
    import subprocess
    import sys
    import tarfile
    import tempfile

    target = os.path.join(out_dir, "gpt2.tiktoken")
    if os.path.exists(target):
        return target
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               WHISPER_SDIST, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"could not download the {WHISPER_SDIST} sdist from PyPI: {result.stderr.strip()[-500:]}")
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(WHISPER_MEMBER)), None)
            if member is None:
                raise RuntimeError(f"{archives[0]} has no {WHISPER_MEMBER}")
            with tar.extractfile(member) as src, open(target + ".tmp", "wb") as dst:
                dst.write(src.read())
    os.replace(target + ".tmp", target)  # never leave a half-written file under the final name
    return target
