"""The lm-eval adapter end to end: local tasks (YAML + JSONL, no download) run through
lm_eval.simple_evaluate and through the command-line entry point on a tiny exported model give
exactly the numbers of the project's own evaluation (prompted_tasks) on the same items, and the
items' answers are built from an independent call of the samplers / the ELBO, so a response given
to the wrong item, an ignored `until` or a wrong choice score shows."""
import importlib.util
import json
import os

import pytest
import torch

from tests.cli import ROOT

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 ?:+=.\n"
# ProSeCo sampling (ancestral steps + corrector loops): on a random network it gives varied
# responses, where greedy block decoding repeats one token
OPTIONS = dict(sampler="proseco", gen_length=8, steps=8, corrector_steps=1, corrector_every=2, mc_num=4,
               batch_size=3, seed=5)
PROMPTS = ["q: 1+1=", "what is 2?", "ab", "name: cat. sound:", "x", "count to 3:"]
MC = [("the sky is", ["blue", "green", "a cat"]), ("2+2=", ["4", "5", "22"]), ("yes or no?", ["yes", "no", "maybe"]),
      ("abc", ["d", "def", "x"])]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A freshly initialised tiny DiT in the exported Hugging Face layout, with a char tokenizer
    (built in-process: seconds, where a pre-training run would take half a minute)."""
    import shutil

    from prosec_mcore.data.tokenizer import CharTokenizer
    from prosec_mcore.hf import convert, dit_bridge
    from prosec_mcore.hf.dit.configuration_proseco import ProsecoConfig
    from prosec_mcore.hf.dit.modeling_proseco import Proseco

    folder = tmp_path_factory.mktemp("hf_tiny")
    tok = CharTokenizer(CHARS)
    tok.save(str(folder))
    config = ProsecoConfig(vocab_size=tok.vocab_size, model_length=48, hidden_dim=32, cond_dim=16, n_blocks=2,
                           n_heads=2, dropout=0.0, time_conditioning=True, mask_token_id=tok.mask_id,
                           eos_token_id=tok.eod, pad_token_id=tok.pad)
    config.auto_map = dict(dit_bridge.AUTO_MAP)
    torch.manual_seed(0)
    model = Proseco(config)
    with torch.no_grad():  # the reference zero-initialises the output layer: every logit would tie
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # larger weights make it repeat one token
    model.save_pretrained(str(folder))
    for name in dit_bridge.MODELING_FILES:
        shutil.copy(os.path.join(convert.HF_DIR, dit_bridge.MODELING_SUBDIR, name), folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def prompted(hf_model):
    from prosec_mcore.evaluation.prompted_model import ModelOptions, PromptedModel

    return PromptedModel(ModelOptions.from_dict(dict(hf=hf_model, **OPTIONS)))


def write_task(folder, name, items, spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf_datasets'}\ntest_split: test\n{spec}")


def model_args(hf_model) -> str:
    return ",".join(f"{k}={v}" for k, v in dict(hf=hf_model, **OPTIONS).items())


def test_lm_eval_equals_own_evaluation(hf_model, prompted, tmp_path, monkeypatch):
    import lm_eval
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    import prosec_mcore.evaluation.lm_eval_adapter  # noqa: F401 - registers "prosec"
    from prosec_mcore.evaluation.elbo import elbo_loglikelihoods
    from prosec_mcore.evaluation.prompted_model import cut_at
    from prosec_mcore.evaluation.prompted_tasks import evaluate_choices, evaluate_generation
    from prosec_mcore.sampling.prompted import generate_responses

    tok = prompted.tokenizer
    # Generation items: the documented behaviour recomputed directly (prompts sampled in order of
    # (length, ids), consecutive batches); half the answers are the response, half are not.
    ids = [tok.encode(p) for p in PROMPTS]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), ids[i]))
    raw = generate_responses(prompted.spec, prompted.loaded.denoiser, prompted.loaded.schedule,
                             [ids[i] for i in order], 8, tok.eod, OPTIONS["seed"], OPTIONS["batch_size"])
    texts = [None] * len(ids)
    for i, r in zip(order, raw):
        texts[i] = tok.decode(r["ids"])
    # the stop string that leaves the most distinct responses
    stop = max(CHARS, key=lambda c: (len({cut_at(t, [c]) for t in texts}), sum(c in t for t in texts)))
    cut = [cut_at(t, [stop]) for t in texts]
    assert cut != texts and len(set(cut)) == len(cut), (texts, stop)  # `until` matters, responses differ
    gen_items = [{"prompt": p, "answer": c if k % 2 == 0 else c + "z"} for k, (p, c) in enumerate(zip(PROMPTS, cut))]

    # Choice items: gold is the ELBO's best choice for half the items, another choice otherwise.
    pairs = [(tok.encode(p), tok.encode(" " + c)) for p, cs in MC for c in cs]
    lls = elbo_loglikelihoods(prompted.loaded.denoiser, prompted.loaded.schedule, pairs, OPTIONS["mc_num"],
                              OPTIONS["batch_size"], OPTIONS["seed"])
    mc_items = []
    for k, (p, cs) in enumerate(MC):
        scores = lls[3 * k:3 * k + 3]
        best = scores.index(max(scores))
        mc_items.append({"prompt": p, "choices": cs, "gold": best if k % 2 == 0 else (best + 1) % 3})

    own_gen = evaluate_generation(prompted, gen_items, until=[stop])
    own_mc = evaluate_choices(prompted, mc_items)
    assert own_gen["exact_match"] == 0.5 and own_mc["acc"] == 0.5
    assert [r["response"] for r in own_gen["items"]] == cut
    assert [ll for r in own_mc["items"] for ll in r["loglikelihoods"]] == lls

    write_task(tmp_path, "prosec_gen", gen_items,
               f'output_type: generate_until\ndoc_to_text: "{{{{prompt}}}}"\ndoc_to_target: "{{{{answer}}}}"\n'
               f"generation_kwargs:\n  until: {json.dumps([stop])}\nmetric_list:\n  - metric: exact_match\n")
    write_task(tmp_path, "prosec_mc", mc_items,
               'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: choices\ndoc_to_target: gold\n'
               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    class LocalTasksOnly(TaskManager):
        """Index only the local tasks: indexing lm-eval's thousands of built-in task YAMLs takes
        10-40 s and is not under test."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)  # the CLI builds its own
    out = lm_eval.simple_evaluate(model="prosec", model_args=model_args(hf_model),
                                  tasks=["prosec_gen", "prosec_mc"], task_manager=LocalTasksOnly(include_path=str(tmp_path)),
                                  log_samples=True, batch_size=2)  # --batch_size: model_args' batch_size wins
    res = out["results"]
    assert res["prosec_gen"]["exact_match,none"] == own_gen["exact_match"] == 0.5
    assert res["prosec_mc"]["acc,none"] == own_mc["acc"] == 0.5
    assert res["prosec_mc"]["acc_norm,none"] == own_mc["acc_norm"]
    by_doc = sorted(out["samples"]["prosec_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in by_doc] == cut
    by_doc = sorted(out["samples"]["prosec_mc"], key=lambda s: s["doc_id"])
    assert [float(r[0]) for s in by_doc for r in s["filtered_resps"]] == lls

    # the command-line entry point: the same task, the same number
    spec = importlib.util.spec_from_file_location("lm_eval_prosec", os.path.join(ROOT, "tools", "lm_eval_prosec.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # in-process: a subprocess would spend ~20 s importing lm-eval and torch again
    assert tool.main(["--model", "prosec", "--model_args", model_args(hf_model), "--tasks", "prosec_mc",
                      "--include_path", str(tmp_path), "--output_path", str(tmp_path / "cli")]) == 0
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cli") for f in fs if f.startswith("results")]
    with open(found[0]) as f:
        assert json.load(f)["results"]["prosec_mc"]["acc,none"] == 0.5


@pytest.mark.parametrize("args, message", [
    ("hf={hf},sampler=nope", "model options: unknown sampler 'nope'"),
    ("hf={hf},mc_nm=3", "unknown model option 'mc_nm'"),
    ("hf={hf},mc_num=many", "model option mc_num='many' is not a valid int"),
    ("sampler=blocks", "give exactly one of checkpoint="),
    ("checkpoint={hf}/none", "not found: give a checkpoint directory"),
])
def test_bad_model_args_are_one_line(hf_model, args, message):
    from prosec_mcore.cli_errors import UserInputError
    from prosec_mcore.evaluation.lm_eval_adapter import ProSeCoLM

    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace("?", r"\?")):
        ProSeCoLM.create_from_arg_string(args.format(hf=hf_model), {"batch_size": 1, "device": None})


def test_pair_split_moves_trailing_spaces_to_the_continuation(prompted):
    tok = prompted.tokenizer
    assert prompted.encode_pair("2+2= ", "4") == (tok.encode("2+2="), tok.encode(" 4"))  # lm-eval's rule
    assert prompted.encode_pair("", "ab") == ([], tok.encode("ab"))
