"""Named special tokens (data.tokenizer.mask_token / eod_token / pad_token): a pretrained model's
tokenizer keeps its own ids, with the mask anywhere (LLaDA: id 126336, not the last), while the
default behaviour (mask appended as the last id) is unchanged."""
import json

import pytest

from prosec_mcore.data.tokenizer import build_tokenizer

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
MASK_AT = 100
SPECIALS = {"<|mdm_mask|>": MASK_AT, "<|endoftext|>": 262, "<|eot_id|>": 263}


@pytest.fixture
def tokenizer_file(tmp_path):
    """A byte-level BPE with 262 learned ids renumbered around a hole at MASK_AT, then two specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=261, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tk.to_str())
    vocab = {t: i if i < MASK_AT else i + 1 for t, i in data["model"]["vocab"].items()}
    data["model"]["vocab"] = {**vocab, **SPECIALS}
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in SPECIALS.items()]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_named_mask_keeps_its_id_in_the_middle(tokenizer_file, tmp_path):
    tok = build_tokenizer("hf_json", tokenizer_file, mask_token="<|mdm_mask|>", pad_token="<|eot_id|>")
    assert (tok.mask_id, tok.eod, tok.pad, tok.vocab_size) == (MASK_AT, 262, 263, 264)
    ids = tok.encode("a <|mdm_mask|> b <|endoftext|>")  # raw text never yields special ids
    assert MASK_AT not in ids and 262 not in ids and max(ids) < 262
    again = build_tokenizer("auto", tok.save(str(tmp_path / "saved")))  # the names travel with the folder
    assert (again.mask_id, again.eod, again.pad, again.vocab_size) == (MASK_AT, 262, 263, 264)


def test_default_names_still_append_the_mask_last(tokenizer_file):
    tok = build_tokenizer("hf_json", tokenizer_file)
    assert (tok.mask_id, tok.vocab_size, tok.eod, tok.pad) == (264, 265, 262, 262)


def test_missing_or_misplaced_names_are_refused(tokenizer_file):
    with pytest.raises(ValueError, match="no token '<mask>'"):
        build_tokenizer("hf_json", tokenizer_file, mask_token="<mask>")
    with pytest.raises(ValueError, match="apply to hf_json tokenizers"):
        build_tokenizer("char", chars="CNO()=", mask_token="<|mdm_mask|>")
