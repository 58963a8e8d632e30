"""Turn documents into megatron-core indexed dataset files (``.bin`` + ``.idx``).

The indexed dataset is megatron's on-disk token store:

* ``<prefix>.bin`` holds every token id of every document back to back, as a
  flat array of a fixed integer dtype (``uint16`` when the vocabulary fits in
  65500 ids, else ``int32``), so it can be memory-mapped and sliced for free.
* ``<prefix>.idx`` holds the length of each document and its byte offset into
  ``.bin`` (plus a header naming the dtype).

Each document is tokenized and followed by the tokenizer's end-of-document id.
At training time ``GPTDataset`` concatenates shuffled documents and cuts the
stream into fixed-length samples, so the EOD ids are what tells the model where
one document stops and the next starts.

Files are written under temporary names and renamed at the end, so an
interrupted run never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Optional

import numpy as np


def token_dtype(vocab_size: int) -> type:
    """The dtype megatron-core's own preprocessing picks for this vocabulary size."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _batched(items: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_documents(docs: Iterable[str], tokenizer, batch_size: int = 64) -> Iterable[tuple[int, list]]:
    """Per batch of ``batch_size`` input documents: how many were read, and the token ids of each
    non-blank one followed by ``tokenizer.eod`` (blank documents are skipped; an id beyond the
    vocabulary is a ValueError). The indexed and the webdataset outputs both tokenize this way."""
    for batch in _batched(docs, batch_size):
        kept = [d for d in batch if d and not d.isspace()]
        tokenized = []
        for ids in tokenizer.encode_batch(kept):
            ids = list(ids) + [tokenizer.eod]
            if max(ids) >= tokenizer.vocab_size:
                raise ValueError(f"token id {max(ids)} >= vocab_size {tokenizer.vocab_size}")
            tokenized.append(ids)
        yield len(batch), tokenized


def preprocess_documents(
    docs: Iterable[str],
    tokenizer,
    output_prefix: str,
    *,
    total: Optional[int] = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict:
    """Tokenize ``docs`` (an iterable of strings, one per document) into
    ``<output_prefix>.bin/.idx``, appending ``tokenizer.eod`` to each document.

    Blank documents are skipped.  Returns a stats dict: ``documents``, ``tokens``
    (including EOD ids), ``skipped_empty``, ``max_token_id``, ``dtype``,
    ``bin_path``, ``idx_path`` and ``seconds``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)

    start = time.time()
    n_docs = n_tokens = n_empty = 0
    max_id = -1
    progress = tqdm(total=total, unit="doc", desc="tokenizing", disable=not show_progress)
    try:
        for read, tokenized in tokenize_documents(docs, tokenizer, batch_size):
            n_empty += read - len(tokenized)
            for ids in tokenized:
                arr = np.asarray(ids, dtype=np.int64)
                max_id = max(max_id, int(arr.max()))
                builder.add_document(arr.astype(dtype), [arr.size])
                n_docs += 1
                n_tokens += arr.size
            progress.update(read)
            progress.set_postfix(tokens=n_tokens)
        builder.finalize(tmp_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for path in (tmp_prefix + ".bin", tmp_prefix + ".idx"):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        progress.close()

    if n_docs == 0:
        os.remove(tmp_prefix + ".bin")
        os.remove(tmp_prefix + ".idx")
        raise ValueError("no non-empty documents were given; nothing was written")
    os.replace(tmp_prefix + ".bin", bin_path)
    os.replace(tmp_prefix + ".idx", idx_path)
    return {
        "documents": n_docs,
        "tokens": n_tokens,
        "skipped_empty": n_empty,
        "max_token_id": max_id,
        "dtype": np.dtype(dtype).name,
        "bin_path": bin_path,
        "idx_path": idx_path,
        "seconds": round(time.time() - start, 3),
    }


def iter_text_documents(paths: Iterable[str], *, split_blank_lines: bool = False,
                        split_lines: bool = False) -> Iterable[str]:
    """Yield documents from ``.txt`` files: one per file; with ``split_blank_lines`` one per
    block of lines separated by blank lines; with ``split_lines`` one per non-empty line
    (e.g. one SMILES string per line)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if split_lines:
            yield from (line for line in text.splitlines() if line.strip())
        elif not split_blank_lines:
            yield text
        else:
            block: list[str] = []
            for line in text.splitlines(keepends=True):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                yield "".join(block).rstrip("\n")


def iter_jsonl_documents(paths: Iterable[str], json_key: str = "text") -> Iterable[str]:
    """Yield ``record[json_key]`` for every line of every JSONL file."""
    import json

    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if json_key not in record:
                    raise KeyError(f"{path}:{lineno}: no key {json_key!r} (keys: {list(record)})")
                yield record[json_key]
