"""Start-up checks of the data layer: a damaged ``.bin/.idx`` pair and a split that cannot give
the samples training or validation asks for are refused by ``build_datasets`` with one line that
names the file (or ``data.split``) and the fix, before megatron builds any index.

The data is real text: the first speeches of Hamlet (the bundled ``shksprdata`` corpus), with a
small BPE tokenizer trained on them, written by the project's own ``preprocess_documents``.
"""

import os
import shutil
import struct

import numpy as np
import pytest

from prosec_mcore.data import (
    build_datasets,
    check_indexed_dataset_files,
    preprocess_documents,
    validate_indexed_dataset,
)
from prosec_mcore.data.corpus import (
    find_shakespeare_texts,
    strip_gutenberg_boilerplate,
    train_bpe_tokenizer,
)

SEQ = 32
N_DOCS = 60


def hamlet_speeches(n: int) -> list[str]:
    text = strip_gutenberg_boilerplate(find_shakespeare_texts()["hamlet"])
    blocks = [" ".join(b.split()) for b in text.split("\n\n")]
    return [b for b in blocks if len(b) > 80][:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer, documents, folder holding ``hamlet.bin/.idx``)."""
    docs = hamlet_speeches(N_DOCS)
    assert len(docs) == N_DOCS
    tok = train_bpe_tokenizer(docs, 300)
    folder = tmp_path_factory.mktemp("hamlet")
    preprocess_documents(docs, tok, str(folder / "hamlet"), show_progress=False)
    return tok, docs, folder


@pytest.fixture
def copy(corpus, tmp_path):
    """A private copy of the dataset: returns its prefix."""
    folder = corpus[2]
    for ext in (".bin", ".idx"):
        shutil.copyfile(folder / f"hamlet{ext}", tmp_path / f"hamlet{ext}")
    return str(tmp_path / "hamlet")


def build(prefix, tok, split="90,10,0", num_samples=(64, 8, 0), seq_length=SEQ):
    return build_datasets(prefix, tok, seq_length, split, 1234, num_samples,
                          os.path.join(os.path.dirname(prefix), "cache"))


def refused(prefix, tok, error=ValueError, **kwargs) -> str:
    with pytest.raises(error) as info:
        build(prefix, tok, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_intact_data_passes(corpus, copy):
    tok, docs, _ = corpus
    info = check_indexed_dataset_files(copy)
    n_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
    assert info["sequences"] == info["documents"] == N_DOCS
    assert info["bin_bytes"] == os.path.getsize(copy + ".bin") == n_tokens * np.dtype(info["dtype"]).itemsize
    train, valid, test = build(copy, tok)
    assert len(train) >= 64 and len(valid) >= 8 and test is None


def test_truncated_bin(corpus, copy):
    tok = corpus[0]
    size = os.path.getsize(copy + ".bin")
    keep = (size // 2) & ~1  # whole uint16 tokens
    os.truncate(copy + ".bin", keep)
    message = refused(copy, tok)
    assert message.startswith(f"{copy}.bin holds {keep:,} bytes but {copy}.idx describes {size:,}")
    assert "truncated" in message and "tools/preprocess_data.py" in message


def test_bin_not_a_multiple_of_the_token_size(corpus, copy):
    os.truncate(copy + ".bin", os.path.getsize(copy + ".bin") - 1)
    message = refused(copy, corpus[0])
    assert f"{copy}.bin" in message and "not a multiple of the 2-byte uint16 tokens" in message


def test_bin_longer_than_the_idx_describes(corpus, copy):
    with open(copy + ".bin", "ab") as f:
        f.write(b"\0\0" * 10)
    message = refused(copy, corpus[0])
    assert f"{copy}.bin holds" in message and "different runs" in message


IDX_DAMAGE = {  # name: (bytes written at offset, offset, length to cut the file to, expected words)
    "magic": (b"NOTANIDX!", 0, None, "bad magic"),
    "version": (struct.pack("<Q", 2), 9, None, "version 2"),
    "dtype": (bytes([99]), 17, None, "unknown token dtype code 99"),
    "header": (b"", 0, 20, "shorter than the 34-byte header"),
    "empty": (b"", 0, 0, "0 bytes"),
}


@pytest.mark.parametrize("damage", sorted(IDX_DAMAGE))
def test_idx_that_is_not_a_megatron_index(corpus, copy, damage):
    patch, offset, cut, why = IDX_DAMAGE[damage]
    with open(copy + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(patch)
        if cut is not None:
            f.truncate(cut)
    message = refused(copy, corpus[0])
    assert message.startswith(f"{copy}.idx is not a megatron-core index ("), message
    assert why in message and "tools/preprocess_data.py" in message


def test_truncated_idx(corpus, copy):
    size = os.path.getsize(copy + ".idx")
    os.truncate(copy + ".idx", size - 8)
    message = refused(copy, corpus[0])
    assert f"{copy}.idx holds {size - 8:,} bytes" in message and "truncated" in message


def test_missing_bin(corpus, copy):
    os.remove(copy + ".bin")
    message = refused(copy, corpus[0], error=FileNotFoundError)
    assert f"{copy}.bin" in message and "prepare_data.py" in message


def test_validation_split_without_documents(corpus, copy):
    tok = corpus[0]
    message = refused(copy, tok, split="100,0,0", num_samples=(64, 8, 0))
    assert message.startswith(f"data.split=100,0,0 gives the validation split of {copy} no documents")
    assert "\"data.split='90,10,0'\"" in message and "train.eval_interval=0" in message
    # too few documents to round to one: 60 * 0.5% = 0.3 documents
    message = refused(copy, tok, split="99.5,0.5,0", num_samples=(64, 8, 0))
    assert "data.split=99.5,0.5,0 gives the validation split" in message and "no documents (of 60)" in message
    # validation off (no valid samples asked for): no error, no valid dataset
    train, valid, _ = build(copy, tok, split="100,0,0", num_samples=(64, 0, 0))
    assert len(train) >= 64 and valid is None


def test_validation_documents_shorter_than_one_sample(corpus, tmp_path):
    """The last document (the validation split of 60,1,0) is one short line of Hamlet."""
    tok, docs, _ = corpus
    short = "Who's there?"
    prefix = str(tmp_path / "short_valid")
    preprocess_documents(docs + [short], tok, prefix, show_progress=False)
    n_short = len(tok.encode(short)) + 1
    assert n_short < SEQ
    message = refused(prefix, tok, split="60,1,0")
    assert message.startswith(f"data.split=60,1,0 gives the validation split of {prefix} 1 document(s) "
                              f"holding {n_short} tokens, fewer than one sample of data.seq_length={SEQ}")
    assert "train.eval_interval=0" in message
    # a sample that fits the short document is fine
    _, valid, _ = build(prefix, tok, split="60,1,0", seq_length=n_short)
    assert len(valid) >= 8


def test_train_split_without_documents(corpus, copy):
    message = refused(copy, corpus[0], split="0,100,0")
    assert message.startswith(f"data.split=0,100,0 gives the train split of {copy} no documents")
    message = refused(copy, corpus[0], split="90,10,0", seq_length=100_000)
    assert "gives the train split" in message and "fewer than one sample of data.seq_length=100000" in message


def test_validate_indexed_dataset_runs_the_file_checks(corpus, copy, tmp_path):
    os.truncate(copy + ".bin", 64)
    with pytest.raises(ValueError, match=r"hamlet\.bin holds 64 bytes .*truncated copy"):
        validate_indexed_dataset(copy, corpus[0], str(tmp_path / "cache"))
