"""SFT data (data/chat_template.py, data/sft.py, tools/preprocess_data.py --sft): records -> chat
template -> LLaDA's SFT layout -> megatron indexed files -> SFTDataset -> micro-batches.

Every expected sample is recomputed here independently: the prompt text written out by hand from
the template's documented format (or by transformers' own apply_chat_template for a tokenizer's
template), encoded by the tokenizer, then the response ids, one EOS, EOS padding, and the roles by
position. No floating point is involved: every comparison is exact.
"""
import importlib.util
import io
import json
import os
import contextlib

import numpy as np
import pytest
import torch

from prosec_mcore.cli_errors import UserInputError
from prosec_mcore.data.batches import make_batch_iterator
from prosec_mcore.data.chat_template import (
    encode_prompt,
    render_prompt,
    render_response,
    resolve_template,
    split_example,
)
from prosec_mcore.data.loader import BatchLoader
from prosec_mcore.data.sft import (
    ROLE_PAD,
    ROLE_PROMPT,
    ROLE_RESPONSE,
    SFTDataset,
    layout_example,
    split_examples,
    write_sft_dataset,
)
from prosec_mcore.data.tokenizer import CharTokenizer, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROL = ["<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# LLaDA-8B-Instruct's chat template (its tokenizer_config.json), Llama-3 style, BOS first
LLADA_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                  "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                  "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                  "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MULTILINE_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
[SYS] {{ message['content'] }}
    {% else %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>
{{ message['content'] }}<|eot_id|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>
{% endif %}"""
CORPUS = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
          "To be, or not to be, that is the question. What is two plus two? Four. Who wrote Hamlet?")
RECORDS = [
    {"prompt": "What is two plus two?", "response": "Four."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
                  {"role": "assistant", "content": "Shakespeare."}]},
    {"prompt": "Shall I compare thee", "response": "to a summer's day?", "system": "Sonnets."},
    {"messages": [{"role": "user", "content": "To be"}, {"role": "assistant", "content": ", or not"},
                  {"role": "user", "content": "to be?"}, {"role": "assistant", "content": "That is the question."}]},
    {"prompt": "", "response": "Thou art more lovely"},
]


def _bpe(folder, specials):
    """A tiny byte-level BPE trained here (no download), saved as <folder>/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """A tokenizer without a chat template (the `default` template applies)."""
    folder = _bpe(str(tmp_path_factory.mktemp("plain")), ["<|endoftext|>", "<|pad|>"])
    return build_tokenizer("hf_json", folder)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A Hugging Face tokenizer folder with LLaDA's chat template in tokenizer_config.json."""
    folder = _bpe(str(tmp_path_factory.mktemp("chat")), ["<|endoftext|>", "<|pad|>"] + CONTROL)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "chat_template": LLADA_TEMPLATE}, f)
    return folder


@pytest.fixture(scope="module")
def chat_tok(chat_folder):
    return build_tokenizer("hf_json", chat_folder)


def _default_prompt(messages):
    """The default template's documented text, written out by hand."""
    turns = "\n".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
    return turns + ("\n" if messages else "") + "<|assistant|>\n"


def _expected(prompt_ids, response_ids, eos, L):
    tokens = list(prompt_ids) + list(response_ids) + [eos]
    roles = [ROLE_PROMPT] * len(prompt_ids) + [ROLE_RESPONSE] * (len(response_ids) + 1)
    return tokens + [eos] * (L - len(tokens)), roles + [ROLE_PAD] * (L - len(roles))


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --- records and templates -----------------------------------------------------------------------

def test_split_example_reads_both_forms():
    assert split_example(RECORDS[0]) == ([{"role": "user", "content": "What is two plus two?"}], "Four.")
    assert split_example(RECORDS[2])[0][0] == {"role": "system", "content": "Sonnets."}
    messages, response = split_example(RECORDS[3])
    assert response == "That is the question." and [m["role"] for m in messages] == ["user", "assistant", "user"]


@pytest.mark.parametrize("record,words", [
    ({"prompt": "x"}, "no 'response'"),
    ({"prompt": 3, "response": "y"}, "'prompt' is a JSON int"),
    ({"prompt": "x", "response": "y", "system": None}, "'system' is a JSON NoneType"),
    ({"prompt": "x", "response": "y", "messages": []}, "both"),
    ({"text": "x"}, "neither"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0] is not an object"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
     "messages[0].content is a JSON list"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "role 'user'"),
    (["a"], "JSON list"),
])
def test_bad_records_are_refused_in_one_line_naming_the_line(record, words):
    with pytest.raises(UserInputError) as err:
        split_example(record, "data.jsonl line 7")
    text = _one_line(err)
    assert text.startswith("data.jsonl line 7: ") and words in text


def test_default_and_none_templates(plain_tok):
    messages, response = split_example(RECORDS[3])
    assert render_prompt(messages, plain_tok) == _default_prompt(messages)  # auto -> default: no own template
    assert render_prompt(messages, plain_tok, "default") == _default_prompt(messages)
    assert render_response(response, plain_tok, messages=messages) == response
    assert render_prompt(messages, plain_tok, "none") == "To be\n, or not\nto be?"
    assert render_response(response, plain_tok, "none", messages) == response
    assert render_prompt([], plain_tok) == "<|assistant|>\n"
    # plain text: the default template's markers are characters, never special ids
    assert encode_prompt(messages, plain_tok) == plain_tok.encode(_default_prompt(messages))


def test_tokenizers_own_template_renders_and_encodes_as_transformers(chat_tok, chat_folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_folder)
    template = resolve_template(None, chat_tok)
    assert template.name == "tokenizer" and template.control_tokens
    for record in RECORDS:
        messages, response = split_example(record)
        prompt = render_prompt(messages, chat_tok)
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == want
        full = hf.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        assert prompt + render_response(response, chat_tok, messages=messages) == full
        assert render_response(response, chat_tok, messages=messages) == response.strip() + "<|eot_id|>"
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert encode_prompt(messages, chat_tok) == list(ids)
    assert encode_prompt(split_example(RECORDS[0])[0], chat_tok)[0] == chat_tok.vocab["<|startoftext|>"]  # BOS id
    # a template file laid out on several lines, indented (trim_blocks/lstrip_blocks matter), reading bos_token
    path = os.path.join(os.path.dirname(chat_tok.path), "multiline.jinja")
    with open(path, "w") as f:
        f.write(MULTILINE_TEMPLATE)
    for record in RECORDS:
        messages, _ = split_example(record)
        want = hf.apply_chat_template(messages, chat_template=MULTILINE_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
        assert render_prompt(messages, chat_tok, path) == want and want.startswith("<|startoftext|>")


def test_template_file_and_bad_templates(plain_tok, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}=>"
                    "{% endif %}")
    messages = [{"role": "user", "content": "Q"}]
    assert render_prompt(messages, plain_tok, str(path)) == "[Q]=>"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for name, words in ((str(bad), "not a valid jinja template"), ("missing.jinja", "not found")):
        with pytest.raises(UserInputError) as err:
            resolve_template(name, plain_tok)
        assert words in _one_line(err)
    # a template whose full conversation does not extend its prompt cannot be split
    with pytest.raises(UserInputError) as err:
        render_response("A", plain_tok, str(path), messages)
    assert "does not start with its own prompt" in _one_line(err)


# --- layout ---------------------------------------------------------------------------------------

def test_layout_pads_with_eos_and_marks_roles():
    tokens, roles, cut_p, cut_r = layout_example([5, 6, 7], [8, 9], eos_id=1, seq_length=8)
    assert tokens.tolist() == [5, 6, 7, 8, 9, 1, 1, 1] and (cut_p, cut_r) == (0, 0)
    assert roles.tolist() == [1, 1, 1, 0, 0, 0, 2, 2]  # the response's own EOS is response, the rest padding
    tokens, roles, _, _ = layout_example([5, 6], [8, 9, 3], eos_id=1, seq_length=6)  # exactly full
    assert tokens.tolist() == [5, 6, 8, 9, 3, 1] and roles.tolist() == [1, 1, 0, 0, 0, 0]


def test_overlong_examples_are_refused_or_truncated_by_the_stated_rule():
    with pytest.raises(UserInputError) as err:
        layout_example([5, 6, 7], [8, 9, 10], eos_id=1, seq_length=6, where="d.jsonl line 4")
    text = _one_line(err)
    assert text.startswith("d.jsonl line 4: ") and "7 tokens (prompt 3 + response 3 + EOS)" in text
    assert "--overlong truncate" in text
    # the prompt fits: it is kept whole; the response keeps its start, without EOS or padding
    tokens, roles, cut_p, cut_r = layout_example([5, 6, 7], [8, 9, 10], 1, 5, "truncate")
    assert tokens.tolist() == [5, 6, 7, 8, 9] and roles.tolist() == [1, 1, 1, 0, 0] and (cut_p, cut_r) == (0, 2)
    # the prompt alone fills the sample: its last L-1 tokens, then the first response token
    tokens, roles, cut_p, cut_r = layout_example([2, 3, 4, 5, 6, 7], [8, 9], 1, 4, "truncate")
    assert tokens.tolist() == [5, 6, 7, 8] and roles.tolist() == [1, 1, 1, 0] and (cut_p, cut_r) == (3, 2)
    # an empty response cut to its EOS: still one response token
    tokens, roles, _, _ = layout_example([2, 3, 4, 5], [], 1, 3, "truncate")
    assert tokens.tolist() == [4, 5, 1] and roles.tolist() == [1, 1, 0]


# --- files and reader ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def written(plain_tok, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("sft") / "chat")
    stats = write_sft_dataset(RECORDS, plain_tok, prefix, 96)
    return prefix, stats


def test_round_trip_equals_an_independent_recomputation(plain_tok, written):
    prefix, stats = written
    L, eos = 96, plain_tok.eod
    expected = []
    for record in RECORDS:
        messages, response = split_example(record)
        expected.append(_expected(plain_tok.encode(_default_prompt(messages)), plain_tok.encode(response), eos, L))
    ds = SFTDataset(prefix, L, seed=3, tokenizer=plain_tok)
    seen = []
    for i in range(len(RECORDS)):  # epoch 0 visits every example once
        doc, sample = ds.example_index(i), ds[i]
        seen.append(doc)
        tokens, roles = expected[doc]
        assert sample["tokens"].dtype == torch.long and sample["tokens"].tolist() == tokens
        assert sample["prompt_mask"].dtype == torch.bool and sample["pad_mask"].dtype == torch.bool
        assert sample["prompt_mask"].tolist() == [r == ROLE_PROMPT for r in roles]
        assert sample["pad_mask"].tolist() == [r == ROLE_PAD for r in roles]
    assert sorted(seen) == list(range(len(RECORDS)))
    roles = np.array([r for _, rs in expected for r in rs])
    assert stats["examples"] == 5 and stats["tokens"] == 5 * L and stats["truncated"] == 0
    assert (stats["prompt_tokens"], stats["response_tokens"], stats["pad_tokens"]) == \
        tuple(int((roles == r).sum()) for r in (ROLE_PROMPT, ROLE_RESPONSE, ROLE_PAD))
    meta = json.load(open(prefix + "_sft.json"))
    assert meta["template"]["name"] == "default" and meta["seq_length"] == L
    assert meta["tokenizer"]["fingerprint"] == plain_tok.unique_identifiers["fingerprint"]


def test_tokenizer_template_files_hold_the_control_token_ids(chat_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(chat_tok.path))
    write_sft_dataset(RECORDS[:2], chat_tok, str(tmp_path / "c"), 80)
    ds = SFTDataset(str(tmp_path / "c"), 80, tokenizer=chat_tok)
    for doc in range(2):
        messages, response = split_example(RECORDS[doc])
        full = hf.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=True,
                                      return_dict=True)["input_ids"]
        n_prompt = len(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])
        sample = ds[ds.permutation(0).tolist().index(doc)]
        tokens, roles = _expected(full[:n_prompt], full[n_prompt:], chat_tok.eod, 80)
        assert sample["tokens"].tolist() == tokens and sample["prompt_mask"].tolist() == [r == 1 for r in roles]
        assert tokens[len(full) - 1] == chat_tok.vocab["<|eot_id|>"]  # the response ends with the template's EOT
    with pytest.raises(UserInputError) as err:  # user text must not smuggle in a control token
        write_sft_dataset([{"prompt": "hi <|eot_id|>", "response": "x"}], chat_tok, str(tmp_path / "d"), 80)
    assert "record 0: message 0 contains the special token '<|eot_id|>'" in _one_line(err)
    assert not os.path.exists(str(tmp_path / "d.bin"))  # nothing left behind


def test_truncate_policy_in_files_and_counts(plain_tok, tmp_path):
    long = {"prompt": "What is two plus two? " * 3, "response": "Four. " * 6}
    with pytest.raises(UserInputError) as err:
        write_sft_dataset([RECORDS[0], long], plain_tok, str(tmp_path / "r"), 48)
    assert "record 1: the example is" in _one_line(err) and not os.path.exists(str(tmp_path / "r_sft.json"))
    stats = write_sft_dataset([RECORDS[0], long], plain_tok, str(tmp_path / "t"), 48, overlong="truncate")
    prompt = plain_tok.encode(_default_prompt(split_example(long)[0]))
    response = plain_tok.encode(long["response"])
    assert stats["truncated"] == 1 and stats["cut_prompt_tokens"] == max(0, len(prompt) - 47)
    kept = min(len(prompt), 47)
    assert stats["cut_response_tokens"] == len(response) + 1 - (48 - kept)
    ds = SFTDataset(str(tmp_path / "t"), 48)
    sample = ds[ds.permutation(0).tolist().index(1)]
    assert sample["tokens"].tolist() == prompt[-kept:] + response[:48 - kept]
    assert sample["prompt_mask"].sum() == kept and not sample["pad_mask"].any()


def test_char_tokenizer_default_template_needs_its_characters(tmp_path):
    tok = CharTokenizer("0123456789.")
    with pytest.raises(UserInputError) as err:
        write_sft_dataset([{"prompt": "12", "response": "3"}], tok, str(tmp_path / "s"), 8)
    assert "--chat-template none" in _one_line(err)
    write_sft_dataset([{"prompt": "1.2", "response": "34"}], tok, str(tmp_path / "s"), 8, template="none")
    sample = SFTDataset(str(tmp_path / "s"), 8, tokenizer=tok)[0]
    assert sample["tokens"].tolist() == tok.encode("1.234") + [tok.eod] * 3
    assert sample["prompt_mask"].tolist() == [True] * 3 + [False] * 5
    assert sample["pad_mask"].tolist() == [False] * 6 + [True] * 2
    with pytest.raises(UserInputError) as err:  # a character outside the vocabulary names the record
        write_sft_dataset([{"prompt": "1", "response": "x"}], tok, str(tmp_path / "u"), 8, template="none")
    assert _one_line(err).startswith("record 0: characters ['x']")


def test_order_is_a_pure_function_of_seed_and_index(written):
    prefix, _ = written
    a, b = SFTDataset(prefix, 96, seed=11), SFTDataset(prefix, 96, seed=11)
    order = list(range(80))
    got_a = [a.example_index(i) for i in order]
    got_b = {i: b.example_index(i) for i in reversed(order)}  # another instance, asked in another order (resume)
    assert got_a == [got_b[i] for i in order]
    epochs = [got_a[e * 5:(e + 1) * 5] for e in range(8)]
    assert all(sorted(e) == list(range(5)) for e in epochs)  # every epoch a permutation
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    assert [SFTDataset(prefix, 96, seed=12).example_index(i) for i in order] != got_a  # the seed matters
    sub = a.subset([1, 3])
    assert sorted(sub.example_index(i) for i in range(2)) == [1, 3]
    # the split depends on the number of examples only, not on the training seed
    train, valid, test = split_examples(100, "80,20,0")
    assert len(train) == 80 and len(valid) == 20 and not len(test)
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(100))
    assert not np.array_equal(valid, np.arange(80, 100))  # a shuffled assignment, not the file's tail


@pytest.mark.parametrize("workers,prefetch", [(0, 0), (0, 1), (1, 1)])
def test_microbatches_carry_the_masks_through_the_loader(written, workers, prefetch):
    prefix, _ = written
    ds = SFTDataset(prefix, 96, seed=5)
    batches = make_batch_iterator(ds, 4, 2, dp_rank=1, dp_size=2)
    loader = BatchLoader(batches, 2, 4, num_workers=workers, prefetch=prefetch)
    got = list(loader)
    loader.close()
    assert [k for k, _ in got] == [2, 3]
    for k, micro in got:
        (mb,) = micro
        index = mb["sample_index"].tolist()
        assert index == [4 * k + 2, 4 * k + 3]  # rank 1 of 2: the second half of the global batch
        assert mb["prompt_mask"].dtype == torch.bool and mb["prompt_mask"].shape == (2, 96)
        for row, i in enumerate(index):
            sample = ds[i]
            for key in ("tokens", "prompt_mask", "pad_mask"):
                assert torch.equal(mb[key][row], sample[key]), key


# --- validation of the files ---------------------------------------------------------------------

def _copy(prefix, dest):
    import shutil

    for suffix in (".bin", ".idx", "_roles.bin", "_roles.idx", "_sft.json"):
        shutil.copy(prefix + suffix, dest + suffix)
    return dest


def _write_indexed(prefix, docs, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_bad_files_are_named_in_one_line(written, plain_tok, chat_tok, tmp_path):
    prefix, _ = written
    cases = []
    p = _copy(prefix, str(tmp_path / "noroles"))
    os.remove(p + "_roles.idx")
    cases.append((p, 96, None, "_roles.bin/.idx not found"))
    p = _copy(prefix, str(tmp_path / "short"))
    _write_indexed(p + "_roles", [[0] * 96] * 4 + [[0] * 95], np.uint8)
    cases.append((p, 96, None, "document 4 has 95 tokens, not seq_length=96"))
    p = _copy(prefix, str(tmp_path / "fewer"))
    _write_indexed(p + "_roles", [[0] * 96] * 4, np.uint8)
    cases.append((p, 96, None, "5 token documents, 4 role documents and 5 examples"))
    p = _copy(prefix, str(tmp_path / "wide"))
    _write_indexed(p + "_roles", [[0] * 96] * 5, np.int32)
    cases.append((p, 96, None, "int32 values, not uint8"))
    cases.append((prefix, 64, None, "samples of 96 tokens but data.seq_length=64; set data.seq_length=96"))
    cases.append((prefix, 96, chat_tok, "another tokenizer than the run's"))
    p = str(tmp_path / "text")
    _write_indexed(p, [[1, 2, 3]], np.uint16)
    cases.append((p, 96, None, "is not an SFT dataset (it is a pre-training corpus: set data.format=text)"))
    p = _copy(prefix, str(tmp_path / "badjson"))
    open(p + "_sft.json", "w").write("{")
    cases.append((p, 96, None, "is not valid JSON"))
    for path, L, tok, words in cases:
        with pytest.raises(ValueError) as err:
            SFTDataset(path, L, tokenizer=tok)
        assert words in _one_line(err), (path, str(err.value))


# --- the run's sources ---------------------------------------------------------------------------

def _cfg(**data):
    """The typed config with data.format=sft and the given data keys (no Hydra: milliseconds)."""
    from prosec_mcore.config import Config

    cfg = Config()
    cfg.data.format, cfg.data.seq_length = "sft", 96
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_run_sources_split_examples_and_record_an_identity(written, plain_tok):
    from prosec_mcore.data.sources import build_run_data, data_state

    prefix, _ = written
    data = build_run_data(_cfg(data_prefix=prefix, split="60,40,0"), plain_tok, (8, 4, 0), "unused")
    train, valid = data.train, data.valid
    assert len(train) == 3 and len(valid) == 2
    assert sorted(train.indices.tolist() + valid.indices.tolist()) == list(range(5))
    assert train.endless and "SFT" in data.description
    assert data.identity["format"] == "sft" and data.identity["train"]["examples"] == 3
    json.dumps(data_state(data.identity, 3, 8, train))  # what a checkpoint stores
    per_split = build_run_data(_cfg(train_data_path=[prefix], valid_data_path=[prefix]),
                               plain_tok, (8, 4, 0), "unused")
    assert len(per_split.train) == len(per_split.valid) == 5
    no_valid = build_run_data(_cfg(data_prefix=prefix, split="100,0,0"), plain_tok, (8, 0, 0), "x")
    assert no_valid.valid is None and len(no_valid.train) == 5


@pytest.mark.parametrize("data,words", [
    ({}, "give data.data_prefix=<prefix>"),
    ({"data_path": ["a", "b"]}, "not a blend of 2"),
    ({"loader": "webdataset", "shards": ["m.json"]}, "set data.loader=indexed"),
    ({"data_prefix": "PREFIX", "document_attention": True}, "data.document_attention is for packed"),
    ({"data_prefix": "PREFIX", "split": "100,0,0"}, "gives the validation split none of the 5 examples"),
    ({"train_data_path": ["PREFIX"]}, "data.valid_data_path is not"),
])
def test_run_sources_refuse_what_sft_cannot_read(written, plain_tok, data, words):
    from prosec_mcore.data.sources import build_run_data

    prefix, _ = written
    cfg = _cfg(**{k: [prefix] if v == ["PREFIX"] else prefix if v == "PREFIX" else v for k, v in data.items()})
    with pytest.raises(ValueError) as err:
        build_run_data(cfg, plain_tok, (8, 4, 0), "unused")
    assert words in _one_line(err)


# --- the tool --------------------------------------------------------------------------------------

def _tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _tool()(argv)
    return code, out.getvalue(), err.getvalue()


def test_tool_writes_and_reports(plain_tok, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    tok = os.path.dirname(plain_tok.path)
    code, out, _ = _run(["--sft", "--input", str(data), "--tokenizer-path", tok, "--seq-length", "96",
                         "--output-prefix", str(tmp_path / "o"), "--no-progress"])
    assert code == 0
    assert "examples:  5 samples of 96 tokens" in out and "roles:     prompt" in out and "0 example(s) truncated" in out
    ds = SFTDataset(str(tmp_path / "o"), 96, tokenizer=plain_tok)
    messages, response = split_example(RECORDS[0])
    tokens, _ = _expected(plain_tok.encode(_default_prompt(messages)), plain_tok.encode(response), plain_tok.eod, 96)
    assert ds[ds.permutation(0).tolist().index(0)]["tokens"].tolist() == tokens
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    for argv, words in (
            (["--input", str(bad), "--seq-length", "96", "--output-prefix", str(tmp_path / "b")],
             f"{bad} line 2: the last message has role 'user'"),
            (["--input", str(data), "--output-prefix", str(tmp_path / "b")], "--sft needs --seq-length"),
            (["--input", str(data), "--seq-length", "8", "--output-prefix", str(tmp_path / "b")],
             "line 1: the example is"),
            (["--input", str(data), "--seq-length", "96", "--output-prefix", str(tmp_path / "b"),
              "--chat-template", "nope.jinja"], "chat template nope.jinja not found")):
        code, _, err = _run(["--sft", "--tokenizer-path", tok, "--no-progress", *argv])
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and words in lines[0], err
    code, _, err = _run(["--input", str(data), "--tokenizer-path", tok, "--output-prefix", str(tmp_path / "c"),
                         "--overlong", "truncate"])
    assert code == 2 and "options of --sft" in err
