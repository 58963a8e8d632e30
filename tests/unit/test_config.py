"""Configuration: Hydra composition, overrides, and one-line errors for impossible settings."""
import pytest

from prosec_mcore.config import ConfigError, validate_config
from prosec_mcore.config_loader import load_config


def test_defaults_compose_to_the_tiny_proseco_run():
    cfg = load_config([])
    assert cfg.model.name == "tiny" and cfg.objective.name == "proseco"
    assert cfg.run_dir == "runs/tiny-proseco"
    validate_config(cfg, world_size=1)


def test_required_overrides_work():
    cfg = load_config(["model=tiny", "objective=mdlm", "train.iters=7", "train.seed=3", "train.log_interval=2",
                       "run_dir=/tmp/somewhere"])
    assert (cfg.objective.name, cfg.train.iters, cfg.train.seed, cfg.train.log_interval, cfg.run_dir) == (
        "mdlm", 7, 3, 2, "/tmp/somewhere")


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_tiny_preset_is_valid_for_every_tp_and_pp_up_to_4(tp, pp):
    cfg = load_config([f"parallel.tp={tp}", f"parallel.pp={pp}"])
    validate_config(cfg, world_size=tp * pp)


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.tp=3"], 3, "num_attention_heads=4 (query groups 4) is not divisible by tp=3"),
    (["parallel.pp=3"], 3, "num_layers=8 is not divisible by pp=3"),
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by tp*pp = 2*2 = 4"),
    (["data.seq_length=4096"], 1, "data.seq_length=4096 exceeds the model's maximum model.max_sequence_length=128"),
    (["train.global_batch_size=12", "train.micro_batch_size=8"], 1, "global_batch_size=12 is not divisible"),
    (["parallel.sequence_parallel=true"], 1, "sequence_parallel=true needs --tp > 1"),
    (["train.precision=bf16"], 1, "train.precision=bf16 needs a GPU"),
    (["objective.corrector_input=everywhere"], 1, "objective.corrector_input='everywhere' is not one of all, masked"),
])
def test_impossible_settings_are_refused_with_a_clear_message(overrides, world, message):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, world_size=world, cuda_available=False)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["train.itres=5", "model.nonsense=1", "model=does_not_exist", "train.iters=many"])
def test_unknown_keys_and_bad_values_are_refused(override):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert str(err.value).startswith("invalid configuration:")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["train.lr=nan"], "train.lr=nan is not a finite number"),
    (["objective.lambda_sc=inf"], "objective.lambda_sc=inf is not a finite number"),
    (["health.spike_factor=-1"], "health.spike_factor=-1.0 is out of range: it must lie in [0, inf)"),
    (["train.adam_beta2=1.0"], "train.adam_beta2=1.0 is out of range: it must lie in [0, 1)"),
    (["train.eval_iters=0"], "train.eval_iters=0 is out of range"),
    (["model.hidden_dropout=1.0"], "model.hidden_dropout=1.0 is out of range"),
    (["train.lr=1e-5"], "train.min_lr=0.0001 is above train.lr=1e-05"),
    (["train.cuda_graph_impl=local"], "bypasses the adaLN modulation"),
])
def test_every_number_is_checked_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(overrides), world_size=1, cuda_available=True, te_available=True)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_file_given_as_run_dir_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        validate_config(load_config([f"run_dir={tmp_path / 'afile'}"]), world_size=1, cuda_available=False)


def test_flags_and_overrides_mix_in_any_order():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "pretrain_prosec.py")
    spec = importlib.util.spec_from_file_location("pretrain_prosec_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args(["model=tiny", "--tp", "2", "train.iters=3", "--pp", "2", "--sp", "objective=mdlm"]) == [
        "model=tiny", "train.iters=3", "objective=mdlm", "parallel.tp=2", "parallel.pp=2",
        "parallel.sequence_parallel=true"]


@pytest.mark.parametrize("option", ["data.document_attention=true", "data.variable_length_fraction=0.01"])
def test_packed_documents_on_te_layers_need_micro_batch_one(option):
    # TE takes packed documents as THD sequences (cu_seqlens) of one sample per micro-batch
    cfg = load_config([option, "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="train.micro_batch_size=1"):
        validate_config(cfg, world_size=1, cuda_available=True, te_available=True)
    validate_config(cfg, world_size=1, cuda_available=False, te_available=False)  # the local layers take a mask
    validate_config(load_config([option, "train.micro_batch_size=1", "train.global_batch_size=4"]), world_size=1,
                    cuda_available=True, te_available=True)


@pytest.mark.parametrize("override,message", [
    ("data.loader=tfrecord", "data.loader='tfrecord' is not one of indexed, webdataset, dali"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range"),
    ("data.variable_length_fraction=1.5", "data.variable_length_fraction=1.5 is out of range"),
    ("data.streams=0", "data.streams=0 is out of range"),
])
def test_data_loading_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config([override]), world_size=1)
