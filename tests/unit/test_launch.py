"""SLURM launch (prosec_mcore/launch/slurm.py, scripts/slurm/pretrain_prosec.sbatch) and the Dockerfile.

The batch script is run for real under bash, with `srun` and `scontrol` replaced by small fakes
on PATH: the fake srun records its command line and behaves like the trainer (it exits 0 once
the run's exit file appears), so the test sends the time-limit signal (USR1) to the script and
checks that the ranks are told to stop, the job requeues itself, and a requeued start resumes
in the same run directory without stopping at once.
"""
import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from prosec_mcore.launch.slurm import SlurmLaunch, command_line, srun_args, torchrun_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "scripts", "slurm", "pretrain_prosec.sbatch")
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def _option(args, name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, args)
    return values[0]


def test_commands_for_two_nodes_of_eight_gpus():
    launch = SlurmLaunch(nodes=2, gpus_per_node=8, run_dir="/lustre/runs/a", tp=4, pp=2, vpp=2, sequence_parallel=True,
                         overrides=["model=1b", "train=owt"], master_addr="node001", master_port=21234, job_id="1234",
                         container_image="/img/p.sqsh", container_mounts=["/lustre:/lustre", "/repo:/workspace/prosec-mcore"])
    srun = srun_args(launch)
    assert srun[0] == "srun" and _option(srun, "--nodes") == "2" and _option(srun, "--ntasks-per-node") == "1"
    assert _option(srun, "--container-image") == "/img/p.sqsh"
    assert _option(srun, "--container-mounts") == "/lustre:/lustre,/repo:/workspace/prosec-mcore"
    torchrun = srun[srun.index("torchrun"):]
    assert torchrun == torchrun_args(launch)
    nnodes, nproc = int(_option(torchrun, "--nnodes")), int(_option(torchrun, "--nproc-per-node"))
    assert nnodes * nproc == launch.world_size == 16
    assert _option(torchrun, "--rdzv-backend") == "c10d"
    assert _option(torchrun, "--rdzv-endpoint") == "node001:21234"
    assert _option(torchrun, "--rdzv-id") == "1234"
    script = torchrun[torchrun.index("tools/pretrain_prosec.py"):]
    assert script[1:7] == ["--tp", "4", "--pp", "2", "--vpp", "2"] and "--sp" in script
    assert script[-2:] == ["model=1b", "train=owt"]
    assert "run_dir=/lustre/runs/a" in script and "train.exit_file=/lustre/runs/a/STOP_AND_REQUEUE" in script
    assert shlex.split(command_line(launch)) == srun  # the one-line form the batch script evals


def test_everything_that_names_the_run_is_stable_across_requeues(monkeypatch):
    """A requeued job keeps SLURM_JOB_ID but gets a new SLURM_RESTART_COUNT (and may get other
    nodes); the run directory, exit file and rendezvous id must not change with it."""
    def command(restart, first_node):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        launch = SlurmLaunch(nodes=2, gpus_per_node=4, run_dir="/shared/run", job_id="77", master_addr=first_node)
        return torchrun_args(launch)

    first, again = command(0, "node003"), command(1, "node010")
    assert [a for a in first if "node0" not in a] == [a for a in again if "node0" not in a]
    assert _option(again, "--rdzv-id") == "77"


@pytest.mark.parametrize("kwargs,message", [
    (dict(nodes=1, gpus_per_node=6, tp=4), "not divisible by tp*pp = 4*1"),
    (dict(nodes=2, gpus_per_node=4, tp=8), "tp=8 exceeds the 4 GPUs of a node"),
    (dict(nodes=1, gpus_per_node=8, run_dir="runs/relative"), "must be absolute"),
    (dict(nodes=1, gpus_per_node=8, overrides=["run_dir=/x"]), "give run_dir through its own option"),
    (dict(nodes=0, gpus_per_node=8), "at least one node"),
])
def test_impossible_launches_are_refused(kwargs, message):
    kwargs.setdefault("run_dir", "/shared/run")
    with pytest.raises(ValueError, match=re.escape(message)):
        srun_args(SlurmLaunch(**kwargs))


# ----------------------------------------------------------------------------- the batch script
FAKE_SRUN = r"""#!/bin/bash
# records its arguments, then runs like the ranks: exit 0 once the run's exit file exists
echo "$@" > "$FAKE_LOG/srun_args"
exit_file=""
for a in "$@"; do case "$a" in train.exit_file=*) exit_file="${a#train.exit_file=}";; esac; done
[ -e "$exit_file" ] && echo "exit file present at start" >> "$FAKE_LOG/srun_events"
[ -n "${FAKE_SRUN_DONE:-}" ] && exit 0
for _ in $(seq 200); do
  if [ -e "$exit_file" ]; then echo "saved and stopped" >> "$FAKE_LOG/srun_events"; exit 0; fi
  sleep 0.05
done
exit 3
"""
FAKE_SCONTROL = r"""#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu017\ngpu018\n'; exit 0; fi
echo "$@" >> "$FAKE_LOG/scontrol_calls"
"""


def _fake_cluster(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), PROSEC_REPO=ROOT,
               RUN_DIR=str(tmp_path / "run"), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu[017-018]", SLURM_GPUS_ON_NODE="4", PROSEC_IMAGE="/img/p.sqsh")
    return env, log


def _start(env, *args):
    return subprocess.Popen(["bash", SBATCH, "--tp", "2", "--pp", "2", "--", "model=tiny", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, timeout=20.0):
    end = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform != "linux", reason="bash batch script")
def test_time_limit_signal_stops_the_ranks_and_requeues(tmp_path):
    env, log = _fake_cluster(tmp_path)
    proc = _start(env)
    _wait_for(log / "srun_args")
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (log / "srun_events").read_text().splitlines() == ["saved and stopped"]
    assert (log / "scontrol_calls").read_text().split() == ["requeue", "4242"]
    srun = shlex.split((log / "srun_args").read_text())
    torchrun = srun[srun.index("torchrun"):]
    assert _option(srun, "--nodes") == "2" and _option(torchrun, "--nproc-per-node") == "4"
    assert _option(torchrun, "--rdzv-endpoint") == f"gpu017:{20000 + 4242 % 20000}"
    assert f"run_dir={tmp_path / 'run'}" in torchrun and torchrun[-1] == "model=tiny"
    assert _option(srun, "--container-mounts").startswith(f"{ROOT}:/workspace/prosec-mcore,")

    # the requeued start: same job id, the previous run's exit file must not stop it at once
    first_args = (log / "srun_args").read_text()
    (log / "srun_events").unlink()
    env = dict(env, SLURM_RESTART_COUNT="1", FAKE_SRUN_DONE="1")
    out, _ = _start(env).communicate(timeout=30)
    assert not (log / "srun_events").exists(), out  # no exit file at start, and no stop
    assert (log / "srun_args").read_text() == first_args  # same run_dir, rendezvous, everything
    assert (log / "scontrol_calls").read_text().split() == ["requeue", "4242"]  # no second requeue


def test_bad_layout_fails_before_srun(tmp_path):
    env, log = _fake_cluster(tmp_path)
    out, _ = subprocess.Popen(["bash", SBATCH, "--tp", "3"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True).communicate(timeout=30)
    assert "not divisible by tp*pp = 3*1" in out
    assert not (log / "srun_args").exists()


def test_sbatch_header_asks_for_requeue_and_the_batch_shell_signal():
    with open(SBATCH) as f:
        header = [line for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue\n" in header
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in header)


# ----------------------------------------------------------------------------- the Dockerfile
def _instructions(path):
    """(INSTRUCTION, arguments) per instruction, joining backslash continuations."""
    out, current = [], ""
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword, rest.strip()))
            current = ""
    return out


def _setup_requirements():
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    reqs = next(k.value for k in call.keywords if k.arg == "install_requires")
    return [ast.literal_eval(e) for e in reqs.elts]


def test_dockerfile_pins_an_ngc_pytorch_base_and_keeps_its_torch():
    instructions = _instructions(DOCKERFILE)
    valid = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
             "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    assert all(keyword in valid for keyword, _ in instructions), instructions
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) == 1 and instructions[0][0] == "FROM"
    image, _, tag = froms[0].partition(":")
    assert image == "nvcr.io/nvidia/pytorch" and tag and tag != "latest" and "$" not in froms[0]
    assert tag[:2].isdigit() and tag.endswith("-py3")  # a dated NGC release, e.g. 25.12-py3
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    pip = [r for r in runs if r.startswith("pip install")]
    assert "pip install --no-deps -e ." in pip  # the package: never its pinned CPU torch
    assert "pip install --no-deps megatron-core==0.16.1" in pip
    installs_torch = [tok for r in pip for tok in shlex.split(r)[2:] if re.match(r"torch($|[=<>~!\[ ])", tok)]
    assert not installs_torch, installs_torch  # nobody installs torch (fcd_torch and the like are fine)
    assert any("cmp - /opt/torch_version_of_image" in r for r in runs)  # and the build checks it


def test_dockerfile_installs_every_requirement_of_setup_py_except_torch():
    pip_text = " ".join(args for keyword, args in _instructions(DOCKERFILE) if keyword == "RUN" and "pip install" in args)
    installed = {shlex.split(f"x {tok}")[1] for tok in pip_text.split()}  # unquote each token
    for req in _setup_requirements():
        if req.startswith("torch"):
            continue
        assert req in installed, f"setup.py requires {req!r}, which docker/Dockerfile does not install as such"
