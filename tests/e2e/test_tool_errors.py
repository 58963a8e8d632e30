"""Bad files given to the command-line tools: exit code 2 and ONE line on stderr, `error: ...`,
naming the file and what is wrong with it, never a traceback (prosec_mcore/cli_errors.py).

Every tool runs as a user runs it (a subprocess). The bad files are made in tmp_path; the damaged
checkpoints are copies of one real checkpoint, written once by a single training iteration."""
import json
import os
import shutil
import struct

import pytest

from tests.cli import ok, run_tool

TINY_RUN = ["model=tiny", "model.num_layers=2", "data.seq_length=32", "train.iters=1", "train.global_batch_size=2",
            "train.micro_batch_size=2", "train.eval_interval=0", "checkpoint.save_interval=1",
            "logging.tensorboard=false"]


def fails_cleanly(result, *names) -> str:
    """The one stderr line of a refused input; it must name each of `names`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr, lines[0]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def tool(name, args):
    return run_tool(name, [str(a) for a in args], timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shakespeare_corpus):
    """A real checkpoint directory (iteration 1 of a tiny run), shared: tests damage copies."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    ok(run_tool("pretrain_prosec.py", shakespeare_corpus + TINY_RUN + [f"run_dir={run_dir}"], timeout=200))
    return run_dir / "checkpoints" / "iter_0000001"


def damaged_copy(checkpoint, tmp_path, damage) -> str:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


def write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def fake_safetensors(path):
    """A valid safetensors file holding no tensors (an 8-byte header length, then the header)."""
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    return write(path, struct.pack("<Q", len(header)) + header)


def hf_folder(tmp_path, config='{"model_type": "proseco"}', weights=True):
    folder = tmp_path / "hf"
    folder.mkdir()
    if config is not None:
        write(folder / "config.json", config)
    if weights:
        fake_safetensors(folder / "model.safetensors")
    return folder


# --- evaluate_prosec.py samples ----------------------------------------------------------------

@pytest.mark.parametrize("content,problem", [
    (b"\x1f\x8b\x08\x00\x80\xff\xfe", "line 1 is not UTF-8 text"),     # a gzip file
    ("two gentlemen of verona\n", "line 1 is not JSON (Expecting value"),
    ('{"tokens": [1, 2]}\n\n{"text": "no tokens"}\n', "line 3 has no 'tokens' key"),
    ('{"tokens": "abc"}\n', "line 1: 'tokens' is not a list of token ids"),
    ("", "holds no samples"),
])
def test_evaluate_samples_refuses_a_bad_sample_file(tmp_path, content, problem):
    bad = write(tmp_path / "samples.jsonl", content)
    line = fails_cleanly(tool("evaluate_prosec.py", ["samples", bad]), bad, problem)
    assert "generate_prosec.py writes" in line


def test_evaluate_samples_refuses_a_directory(tmp_path):
    fails_cleanly(tool("evaluate_prosec.py", ["samples", tmp_path]), tmp_path, "is a directory")


# --- generate_prosec.py ------------------------------------------------------------------------

def test_generate_refuses_a_missing_path_and_a_folder_without_checkpoint(tmp_path):
    fails_cleanly(tool("generate_prosec.py", [tmp_path / "nope"]), tmp_path / "nope")
    fails_cleanly(tool("generate_prosec.py", [tmp_path]), tmp_path, "no complete checkpoint")


def truncate(path, size):
    write(path, path.read_bytes()[:size])


# The file each damage leaves unreadable must be named (training/checkpoint.py's own manifest
# check may word it first; either wording passes).
@pytest.mark.parametrize("damage,named", [
    (lambda d: write(d / "common.pt", "garbage"), "common.pt"),
    (lambda d: write(d / "metadata.json", "{trunc"), "metadata.json"),
    (lambda d: os.remove(d / "__0_1.distcp"), "__0_1.distcp is missing"),
    (lambda d: truncate(d / "__0_0.distcp", 1000), "__0_0.distcp"),
])
def test_generate_names_the_damaged_file_of_a_checkpoint(checkpoint, tmp_path, damage, named):
    bad = damaged_copy(checkpoint, tmp_path, damage)
    fails_cleanly(tool("generate_prosec.py", [bad, "--out", tmp_path / "s.jsonl"]), bad, named)


def test_generate_refuses_an_unwritable_out_before_sampling(checkpoint, tmp_path):
    blocker = write(tmp_path / "file", "")
    fails_cleanly(tool("generate_prosec.py", [checkpoint, "--out", blocker / "s.jsonl"]), blocker, "is a file")
    fails_cleanly(tool("generate_prosec.py", [checkpoint, "--out", tmp_path]), tmp_path, "is a directory")


@pytest.mark.parametrize("config,weights,problem", [
    (None, True, "no config.json"),
    ('{"model_type": "proseco"}', False, "has no weights"),
    ("{not json", True, "config.json is not valid JSON"),
])
def test_generate_refuses_a_bad_hf_folder(tmp_path, config, weights, problem):
    folder = hf_folder(tmp_path, config, weights)
    fails_cleanly(tool("generate_prosec.py", [folder, "--hf"]), folder, problem)


def test_generate_refuses_truncated_hf_weights(tmp_path):
    folder = hf_folder(tmp_path)
    write(folder / "model.safetensors", (folder / "model.safetensors").read_bytes()[:6])
    fails_cleanly(tool("generate_prosec.py", [folder, "--hf"]), folder / "model.safetensors", "could not be read")


# --- convert_checkpoint.py ---------------------------------------------------------------------

def test_export_refuses_a_missing_or_corrupt_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "hf_out"
    fails_cleanly(tool("convert_checkpoint.py", ["export", "--checkpoint", tmp_path / "nope", "--out", out]),
                  tmp_path / "nope")
    bad = damaged_copy(checkpoint, tmp_path, lambda d: write(d / "common.pt", ""))
    fails_cleanly(tool("convert_checkpoint.py", ["export", "--checkpoint", bad, "--out", out]), bad, "common.pt")
    assert not out.exists()


def test_export_refuses_an_out_that_is_a_file(checkpoint, tmp_path):
    out = write(tmp_path / "hf_out", "")
    fails_cleanly(tool("convert_checkpoint.py", ["export", "--checkpoint", checkpoint, "--out", out]),
                  out, "exists and is a file")


@pytest.mark.parametrize("config,weights,problem", [
    (None, True, "no config.json"),
    ('{"model_type": "proseco",', True, "config.json is not valid JSON"),
    ('["a list"]', True, "config.json holds a JSON list, not an object"),
    ('{"model_type": "proseco"}', False, "has no weights"),
    ('{"model_type": "bert"}', True, "config.json has model_type='bert': not supported"),
    # a key left out takes the family's default (as its config class does); the weights must fit it
    ('{"model_type": "proseco"}', True, "the weights lack backbone.vocab_embed.embedding"),
])
def test_import_refuses_a_bad_hf_folder(tmp_path, config, weights, problem):
    folder = hf_folder(tmp_path, config, weights)
    out = tmp_path / "imported"
    fails_cleanly(tool("convert_checkpoint.py", ["import", "--hf", folder, "--out", out]), folder, problem)
    assert not out.exists()


def test_import_refuses_an_out_that_is_a_file(tmp_path):
    out = write(tmp_path / "imported", "")
    fails_cleanly(tool("convert_checkpoint.py", ["import", "--hf", hf_folder(tmp_path), "--out", out]),
                  out, "exists and is a file")


# --- preprocess_data.py ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_json(shakespeare_corpus):
    return shakespeare_corpus[0].split("=", 1)[1] + "/tokenizer.json"


def preprocess(inputs, tokenizer, prefix, *extra):
    return tool("preprocess_data.py", ["--input", *inputs, "--tokenizer-path", tokenizer,
                                       "--output-prefix", prefix, "--no-progress", *extra])


@pytest.mark.parametrize("name,content,problem", [
    ("docs.jsonl", "plain text, not JSON\n", "line 1 is not JSON"),
    ("docs.jsonl", '{"text": "a"}\n{"body": "b"}\n', "line 2 has no 'text' key"),
    ("docs.jsonl", '{"text": 7}\n', "line 1: 'text' is a JSON int, not text"),
    ("docs.jsonl", "", "holds no documents"),
    ("docs.txt", b"\x80\x81\xfe\xff", "is not UTF-8 text"),
])
def test_preprocess_refuses_a_bad_input(tmp_path, tokenizer_json, name, content, problem):
    bad = write(tmp_path / name, content)
    fails_cleanly(preprocess([bad], tokenizer_json, tmp_path / "out" / "data"), bad, problem)
    assert not (tmp_path / "out" / "data.bin").exists()


def test_preprocess_refuses_a_missing_input(tmp_path, tokenizer_json):
    fails_cleanly(preprocess([tmp_path / "nope.jsonl"], tokenizer_json, tmp_path / "data"),
                  tmp_path / "nope.jsonl", "not found")


@pytest.mark.parametrize("tokenizer,problem", [
    ("missing.json", "not found"),
    ("docs.jsonl", "is not a tokenizer file"),     # JSON lines, not a tokenizer
])
def test_preprocess_refuses_a_bad_tokenizer(tmp_path, tokenizer, problem):
    docs = write(tmp_path / "docs.jsonl", '{"text": "a"}\n')
    fails_cleanly(preprocess([docs], tmp_path / tokenizer, tmp_path / "data"), tmp_path / tokenizer, problem)


def test_preprocess_refuses_an_output_prefix_under_a_file(tmp_path, tokenizer_json):
    docs = write(tmp_path / "docs.jsonl", '{"text": "a"}\n')
    blocker = write(tmp_path / "file", "")
    fails_cleanly(preprocess([docs], tokenizer_json, blocker / "sub" / "data"), blocker, "is a file")
