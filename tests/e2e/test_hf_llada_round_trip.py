"""A folder in LLaDA-8B-Base's real format (every key of its config.json, sizes scaled down;
bf16 weights in two shards with an index; generation_config.json with bos; a tokenizer whose
mask sits mid-vocabulary) goes through `convert_checkpoint.py import` and `export` and comes back
with every id, the dtype, the tokenizer files and every tensor intact; the export is sharded as
asked; transformers loads it as a causal LM and `generate` honours its pad and eos ids; and an
unimplemented setting is refused by name in one line."""
import json
import os

import pytest
import torch

from prosec_mcore.hf import llada_bridge
from tests.cli import ok, run_tool

WORDS = 60
MASK, BOS, EOS, ROWS = 40, 60, 61, 64  # tokenizer ids 0..61, model rows 64 (as LLaDA: rows > ids)
CONFIG = {**llada_bridge.LLADA_8B_BASE_CONFIG, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
          "mlp_hidden_size": 48, "vocab_size": ROWS, "embedding_size": ROWS, "max_sequence_length": 64,
          "mask_token_id": MASK, "eos_token_id": EOS, "pad_token_id": EOS}
GENERATION = {**llada_bridge.LLADA_8B_BASE_GENERATION_CONFIG, "bos_token_id": BOS, "eos_token_id": EOS,
              "pad_token_id": EOS}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(WORDS) if i != MASK}
    vocab.update({"<|mdm_mask|>": MASK, "<|startoftext|>": BOS, "<|endoftext|>": EOS})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|mdm_mask|>", "<|startoftext|>", "<|endoftext|>"])
    return tk.to_str()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from safetensors.torch import save_file

    from prosec_mcore.hf.llada.configuration_llada import LLaDAConfig
    from prosec_mcore.hf.llada.modeling_llada import LLaDAModelLM

    folder = tmp_path_factory.mktemp("llada") / "tiny-LLaDA-8B-Base"
    folder.mkdir()
    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig(**CONFIG))
    state = {k: (v + 0.3 * torch.randn_like(v)).to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():  # the hub's layout: shards and an index
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())},
         "weight_map": {k: s for s, keys in halves.items() for k in keys}}))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|startoftext|>",
                                                              "eos_token": "<|endoftext|>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|startoftext|>",
                                                                "eos_token": "<|endoftext|>"}))
    return folder, state


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    folder, _ = source
    root = tmp_path_factory.mktemp("round_trip")
    printed = ok(run_tool("convert_checkpoint.py", ["import", "--hf", str(folder), "--out", str(root / "ck")],
                          timeout=200)).stdout
    assert "(bfloat16)" in printed and "data.tokenizer.mask_token='<|mdm_mask|>'" in printed
    out = root / "hf"
    printed = ok(run_tool("convert_checkpoint.py", ["export", "--checkpoint", str(root / "ck"), "--out", str(out),
                                                    "--max-shard-size", "10KB"], timeout=200)).stdout
    assert "bfloat16" in printed
    return out


def test_round_trip_keeps_ids_dtype_tokenizer_and_tensors(source, exported):
    from safetensors import safe_open

    folder, state = source
    config = json.loads((exported / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "auto_map"} == {k: v for k, v in CONFIG.items() if k != "auto_map"}
    assert CONFIG["auto_map"].items() <= config["auto_map"].items()
    assert json.loads((exported / "generation_config.json").read_text()) == GENERATION
    for name in TOKENIZER_FILES:  # the folder's own files, byte for byte
        assert (exported / name).read_bytes() == (folder / name).read_bytes(), name
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (exported / "model.safetensors").exists()
    seen = {}
    for shard in shards:
        with safe_open(str(exported / shard), framework="pt") as f:
            seen.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(seen) == set(state)
    assert all(seen[k].dtype == torch.bfloat16 and torch.equal(seen[k], state[k]) for k in state)


def test_transformers_generate_honours_pad_and_eos(exported):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True, dtype=torch.float32).eval()
    gen = hf.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (BOS, EOS, EOS)
    a, b = [3, 7, 11, 2, 9, 5], [8, 1, 4, 6]
    batch = torch.tensor([a, [EOS, EOS] + b])  # b left-padded with the pad id
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        both = hf.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False)
        alone = [hf.generate(torch.tensor([p]), max_new_tokens=3, do_sample=False)[0, len(p):] for p in (a, b)]
        assert torch.equal(both[0, 6:], alone[0]) and torch.equal(both[1, 6:], alone[1])  # padding is masked out
        # eos now wins after prompt a (its row is the last hidden state, scaled): generation stops there
        last = hf(torch.tensor([a]), output_hidden_states=True).hidden_states[-1][0, -1]
        hf.model.transformer.ff_out.weight[EOS] = 100 * last
        stopped = hf.generate(torch.tensor([a]), max_new_tokens=4, do_sample=False)
    assert stopped[0].tolist() == a + [EOS]


def test_an_unimplemented_setting_is_refused_in_one_line(source, tmp_path, capsys):
    import importlib.util

    folder, _ = source
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(folder):
        if name != "config.json":
            os.symlink(folder / name, bad / name)
    (bad / "config.json").write_text(json.dumps({**CONFIG, "attention_layer_norm": True}))
    spec = importlib.util.spec_from_file_location("convert_checkpoint", "tools/convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["import", "--hf", str(bad), "--out", str(tmp_path / "ck")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "attention_layer_norm=True: not supported" in lines[0], lines
    assert not (tmp_path / "ck").exists()
