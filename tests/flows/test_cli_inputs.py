"""Bad inputs through the real command line: one line naming the field, exit code 2, nothing written.

Each case runs ``python flows/craft_flow.py ...`` as a user would (offline, no GPU) with an
artifacts root that does not exist yet, and checks that the run stops before any stage with exactly
one line on stderr that names the config field (or file) and the cause, exit code 2, and that the
artifacts root was never created.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, "flows/craft_flow.py", *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def make_inputs(tmp: Path) -> None:
    """The bad files the cases point at."""
    (tmp / "listed.yaml").write_text("- cache\n- train\n")
    (tmp / "scalar.yaml").write_text("42\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "empty_dataset").mkdir()


def cases(tmp: Path, teacher: Path) -> dict[str, tuple[list[str], str]]:
    """Bad input name -> (command line, regex of its one stderr line), files under ``tmp``."""
    listed, scalar, a_file, not_a_dataset = tmp / "listed.yaml", tmp / "scalar.yaml", tmp / "a_file", tmp / "empty_dataset"
    smoke = ["--preset", "smoke"]
    return {
        "YAML top level is a list (with --stages)": (
            ["--config", str(listed), "--stages", "cache"],
            f"config file {listed}: the top level must be a mapping .* not a list"),
        "YAML top level is a scalar (with an override)": (
            ["--config", str(scalar), "train.steps=2"], f"config file {scalar}: .* not a int"),
        "unknown field": ([*smoke, "cache.n_anchor=4"], "config field cache.n_anchor=4: .*unknown field"),
        "invalid value": ([*smoke, "train.retention.every_k=0"], "config field train.retention.every_k=0"),
        "unknown stage": ([*smoke, "--stages", "cache,deploy"], "config field stages.1='deploy'"),
        "dataset root missing": (
            [*smoke, f"cache.dataset.root={tmp}/nowhere"],
            f"cache.dataset.root='{tmp}/nowhere': {tmp}/nowhere does not exist; fix: point it at a LeRobotDataset"),
        "dataset root not a LeRobotDataset": (
            [*smoke, f"cache.dataset.root={not_a_dataset}"], "cache.dataset.root=.*no meta/info.json"),
        "hub dataset not cached offline": (
            [*smoke, "cache.dataset.root=null", "cache.dataset.repo_id=craft-test/not-cached"],
            "cache.dataset.repo_id='craft-test/not-cached': not in the local dataset cache .* HF_HUB_OFFLINE"),
        "teacher folder missing": (
            [*smoke, f"cache.teacher.path={tmp}/no_teacher"],
            f"cache.teacher.path='{tmp}/no_teacher': the folder {tmp}/no_teacher does not exist"),
        "hub teacher not cached offline": (
            [*smoke, "cache.teacher.path=craft-test/not-cached"],
            "cache.teacher.path='craft-test/not-cached': not in the local hub cache and HF_HUB_OFFLINE is set"),
        "hub teacher unreachable online (no HF_HUB_OFFLINE)": (
            [*smoke, "cache.teacher.path=craft-test/not-cached"],
            "cache.teacher.path='craft-test/not-cached': cannot be fetched from the hub \\(.*\\); fix: check the repo id "
            "and the network"),
        "layers beyond the teacher's depth": (
            [*smoke, f"cache.teacher.path={teacher}", "cache.layers=[99]"],
            "cache.layers=\\[99\\]: the teacher's backbone has depth 2"),
        "device without CUDA": ([*smoke, "train.device=cuda"], "train.device='cuda': CUDA is not available"),
        "artifacts root is a file": ([*smoke, f"artifacts_root={a_file}"], f"artifacts_root='{a_file}': it is a file"),
        "selected stage without its upstream": (
            [*smoke, "--stages", "train"],
            "stages=\\['train'\\]: train_\\w+, train_\\w+ consume assets, cache, not selected .* fix: add assets, "
            "cache to the stages"),
    }


CASES = list(cases(Path("/tmp"), Path("/tmp")))


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_with_one_line_exit_2_and_nothing_written(tmp_path, request, name):
    teacher = request.getfixturevalue("tiny_pi0_fast") if "layers" in name else tmp_path / "unused"
    make_inputs(tmp_path)
    args, message = cases(tmp_path, teacher)[name]
    root = tmp_path / "artifacts"
    if not any(arg.startswith("artifacts_root=") for arg in args):
        args = [*args, f"artifacts_root={root}"]
    env = {"HF_HOME": str(tmp_path / "hf_home")}
    if "online" in name:
        env["HF_HUB_OFFLINE"] = "0"
    result = run_cli(*args, env=env)
    errors = lines(result.stderr)
    print(f"{name}: {errors[0] if errors else result.stderr[-300:]}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(message, errors[0]), errors[0]
    assert not root.exists(), f"{root} was created"


@pytest.mark.parametrize("argv", [
    ["--preset", "smoke", "train.steps=3", "--stages", "cache", "cache.n_anchors=4"],
    ["train.steps=3", "--preset", "smoke", "cache.n_anchors=4", "--stages", "cache"],
])
def test_overrides_are_accepted_anywhere_on_the_line(argv):
    from flows.craft_flow import config_from_args, parse_args

    cfg = config_from_args(parse_args(argv))
    assert (cfg.name, cfg.train.steps, cfg.cache.n_anchors, cfg.stages) == ("craft-smoke", 3, 4, ["cache"])
