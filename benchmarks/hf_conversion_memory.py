"""Peak host memory of `convert_checkpoint.py import` and `export` on the `1b` shape.

    .venv/bin/python benchmarks/hf_conversion_memory.py --work /tmp/hf_mem [--vocab 32000] [--keep]

1. writes a random LLaDA-format folder of the configs/model/1b.yaml shape in bf16, sharded at 2GB
   with an index, as the hub ships LLaDA (one tensor at a time: this step needs little memory);
2. runs `convert_checkpoint.py import` on it and `export` of the result (bf16, 2GB shards), each
   in its own process, and reports each one's peak resident memory (ru_maxrss of the child)
   next to the sizes that bound it: the fp32 model one process holds (4 bytes x parameters)
   and the largest shard.

The conversions stream one tensor at a time, so the peak is about the fp32 model plus a shard
(plus the interpreter and libraries, ~1 GB); docs/hf.md has the numbers and the 8B arithmetic.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shape() -> dict:
    import yaml

    with open(os.path.join(ROOT, "configs", "model", "1b.yaml")) as f:
        return yaml.safe_load(f)


def write_source(folder: str, vocab: int, shard: str) -> dict:
    import torch

    from prosec_mcore.hf import llada_bridge, shards

    m = shape()
    config = {**llada_bridge.LLADA_8B_BASE_CONFIG, "d_model": m["hidden_size"], "n_heads": m["num_attention_heads"],
              "n_kv_heads": m["num_query_groups"], "n_layers": m["num_layers"], "mlp_hidden_size": m["ffn_hidden_size"],
              "max_sequence_length": m["max_sequence_length"], "rope_theta": float(m["rotary_base"]),
              "vocab_size": vocab, "embedding_size": vocab, "mask_token_id": vocab - 1, "eos_token_id": vocab - 2,
              "pad_token_id": vocab - 2}
    os.makedirs(folder, exist_ok=True)
    d, kv = m["hidden_size"], m["num_query_groups"] * m["hidden_size"] // m["num_attention_heads"]
    ffn = m["ffn_hidden_size"]
    shapes = {"wte": (vocab, d), "ln_f": (d,), "ff_out": (vocab, d), "attn_norm": (d,), "ff_norm": (d,),
              "q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "attn_out": (d, d), "ff_proj": (ffn, d),
              "up_proj": (ffn, d), "ff_out_block": (d, ffn)}
    writer = shards.ShardWriter(folder, shards.parse_size(shard))
    gen = torch.Generator().manual_seed(0)
    params = 0

    class Cfg:  # the names only depend on num_layers
        num_layers = m["num_layers"]

    for name in llada_bridge.hf_names(Cfg):
        part = name.split(".")[-2]
        key = "ff_out_block" if part == "ff_out" and ".blocks." in name else part
        tensor = (torch.randn(shapes[key], generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, tensor)
        params += tensor.numel()
    writer.close()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"parameters": params}


def measure(args: list) -> dict:
    """Run a tool in a child process; its wall time and peak resident memory (GiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.time()
    subprocess.run([sys.executable] + args, cwd=ROOT, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    if peak <= before:
        print("warning: this child's peak is not above an earlier child's; the figure is a bound")
    return {"seconds": round(time.time() - start, 1), "peak_rss_gib": round(peak / 2**20, 2)}


def largest_file_gib(folder: str) -> float:
    return round(max(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                     if f.endswith(".safetensors")) / 2**30, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/hf_conversion_memory")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="2GB")
    parser.add_argument("--keep", action="store_true", help="keep the folders written")
    args = parser.parse_args()
    src, ck, out = (os.path.join(args.work, n) for n in ("source", "imported", "exported"))
    shutil.rmtree(args.work, ignore_errors=True)
    info = write_source(src, args.vocab, args.shard)
    report = {"shape": "1b (configs/model/1b.yaml)", "vocab": args.vocab, "parameters": info["parameters"],
              "fp32_model_gib": round(4 * info["parameters"] / 2**30, 2),
              "bf16_folder_gib": round(2 * info["parameters"] / 2**30, 2), "largest_source_shard_gib":
              largest_file_gib(src)}
    report["import"] = measure(["tools/convert_checkpoint.py", "import", "--hf", src, "--out", ck])
    # the export's child runs after the import's: ru_maxrss of children is their maximum, so the
    # export is measured in a fresh process of its own
    export = subprocess.run([sys.executable, __file__, "--measure-export", ck, out, args.shard], cwd=ROOT,
                            check=True, capture_output=True, text=True)
    report["export"] = json.loads(export.stdout.strip().splitlines()[-1])
    report["largest_exported_shard_gib"] = largest_file_gib(out)
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure-export":
        ck, out, shard = sys.argv[2:5]
        print(json.dumps(measure(["tools/convert_checkpoint.py", "export", "--checkpoint", ck, "--out", out,
                                  "--max-shard-size", shard])))
        sys.exit(0)
    sys.exit(main())
