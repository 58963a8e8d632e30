"""QM9 preparation: canonical, de-duplicated, padded one-molecule documents that megatron's
GPTDataset serves as exactly one molecule per sample, and the train split the novelty metric
uses is the one megatron trains on."""
import csv

import pytest
import torch

pytest.importorskip("rdkit", reason="QM9 preparation needs RDKit (scripts/setup_env.sh installs it)")

from prosec_mcore.data import build_datasets, build_tokenizer  # noqa: E402
from prosec_mcore.data.batches import sample_document  # noqa: E402
from prosec_mcore.data.qm9 import (DATA_NAME, decode_molecule, pad_document, prepare_qm9_corpus,  # noqa: E402
                                   training_smiles)

ROWS = ["CCO", "OCC", "C1CC1", "c1ccccc1", "CC(=O)O", "N#N", "C" * 40, "CN", "CCN", "O=C=O",
        "CC#N", "C1CCCCC1", "CCCC", "COC", "C=C", "CF"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = tmp_path_factory.mktemp("qm9_src")
    with open(src / "qm9_part1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "SMILES", "InChi"])
        for i, s in enumerate(ROWS):
            writer.writerow([i, s, "x"])
    out = tmp_path_factory.mktemp("qm9")
    manifest = prepare_qm9_corpus(str(out), seq_length=16, seed=3, source=str(src))
    return out, manifest


def test_manifest_counts_duplicates_and_long_molecules(prepared):
    _, manifest = prepared
    # "OCC" is "CCO" spelled differently; the 40-carbon chain does not fit 16 tokens
    assert manifest["raw_rows"] == 16 and manifest["duplicates"] == 1 and manifest["dropped_too_long"] == 1
    assert manifest["molecules"] == 14
    assert manifest["seq_length"] == 16


def test_every_sample_is_one_whole_padded_molecule(prepared, tmp_path):
    out, manifest = prepared
    tok = build_tokenizer("auto", str(out))
    assert tok.mask_id == tok.vocab_size - 1 == manifest["vocab_size"] - 1
    train, valid, _ = build_datasets(str(out / DATA_NAME), tok, 16, "70,30,0", 1, (0, 0, 0), str(tmp_path))
    train_molecules = sorted(decode_molecule(train[i]["tokens"], tok) for i in range(len(train)))
    assert train_molecules == sorted(training_smiles(str(out), "70,30,0"))
    valid_molecules = {decode_molecule(valid[i]["tokens"], tok) for i in range(len(valid))}
    assert not valid_molecules & set(train_molecules) and len(valid_molecules) + len(train_molecules) == 14
    for i in range(len(train)):  # the document a label is looked up by is the sample's own document
        doc = sample_document(train, i)
        assert train[i]["tokens"].tolist() == train.dataset.get(doc).tolist()
    first = train[0]["tokens"]
    n = len(decode_molecule(first, tok))
    assert int(first[n]) == tok.eod and bool((first[n + 1:] == tok.pad).all())


def test_pad_and_decode():
    doc = pad_document([1, 2, 3], eod=5, pad=6, seq_length=7)
    assert doc.tolist() == [1, 2, 3, 5, 6, 6, 6]
    with pytest.raises(ValueError, match="do not fit"):
        pad_document([1] * 7, eod=5, pad=6, seq_length=7)
    tok = build_tokenizer("char", chars="CNO()=")
    ids = tok.encode("C(=O)N") + [tok.eod] + tok.encode("CC") + [tok.pad]
    assert decode_molecule(torch.tensor(ids), tok) == "C(=O)N"  # nothing after the first special id


def test_evaluate_tool_scores_known_molecules(prepared, tmp_path):
    import json

    from tests.cli import ok, run_tool

    out, _ = prepared
    tok = build_tokenizer("auto", str(out))
    train = training_smiles(str(out), "70,30,0")
    novel = next(m for m in ("CC(C)C", "CCCO", "OCCO") if m not in train)
    rows = [train[0], novel, "C1CC", novel]  # in the training set, novel, invalid (open ring), duplicate
    samples = tmp_path / "s.jsonl"
    with open(samples, "w") as f:
        for i, smi in enumerate(rows):
            f.write(json.dumps({"index": i, "tokens": pad_document(tok.encode(smi), tok.eod, tok.pad, 16).tolist()}) + "\n")
    metrics_path = tmp_path / "m.json"
    printed = ok(run_tool("evaluate_prosec.py", ["samples", str(samples), "--molecules", str(out), "--split",
                                                 "70,30,0", "--out", str(metrics_path)])).stdout
    assert "validity" in printed
    with open(metrics_path) as f:
        m = json.load(f)[0]
    assert (m["num_samples"], m["num_valid"], m["num_unique"], m["num_novel"]) == (4, 3, 2, 1)
    assert m["fcd"] == m["fcd"] and m["fcd"] >= 0  # computed (not NaN) against the held-out molecules


def test_missing_data_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="qm9_part"):
        prepare_qm9_corpus(str(tmp_path / "out"), source=str(tmp_path))
