"""Pre-flight checks, failed-stage clean-up and which failures Prefect retries.

The command line's end-to-end behaviour (one line, exit 2, nothing written) is in
tests/flows/test_cli_inputs.py; these check the pieces in process.
"""

import json
from pathlib import Path

import pytest

from craft_core.config import load_preset
from craft_core.pipeline.fingerprint import StageDir, run_stage
from craft_core.pipeline.isolation import StageProcessError
from craft_core.pipeline.preflight import PreflightError, is_input_error, preflight


def problems(cfg) -> list[str]:
    with pytest.raises(PreflightError) as excinfo:
        preflight(cfg)
    lines = str(excinfo.value).splitlines()
    assert len(lines) == len(excinfo.value.problems) >= 1
    return lines


def test_a_new_config_passes_and_writes_nothing(tmp_path):
    root = tmp_path / "artifacts"
    preflight(load_preset("smoke", [f"artifacts_root={root}", "stages=[assets,cache]"]))
    assert not root.exists()


def test_only_the_selected_stages_inputs_are_checked(tmp_path):
    root = f"artifacts_root={tmp_path / 'artifacts'}"
    # the eval device is not consumed by assets + cache
    preflight(load_preset("smoke", [root, "stages=[assets,cache]", "eval.device=cuda:7"]))
    [line] = problems(load_preset("smoke", [root, "stages=[assets,cache,eval]", "eval.device=cuda:7"]))
    assert line.startswith("eval.device='cuda:7': CUDA is not available")


def test_every_problem_is_one_line_naming_field_value_cause_and_fix(tmp_path):
    lines = problems(load_preset("smoke", [
        f"artifacts_root={tmp_path / 'artifacts'}", f"cache.dataset.root={tmp_path}/none",
        f"cache.teacher.path={tmp_path}/no_teacher", "train.device=cuda",
    ]))
    assert [line.split("=", 1)[0] for line in lines] == ["train.device", "cache.teacher.path", "cache.dataset.root"]
    assert all("; fix: " in line for line in lines)


def _built_assets(cfg, teacher: Path, dataset: Path) -> None:
    """Mark the assets stage of ``cfg`` complete with copies of a teacher and of task A's dataset."""
    import shutil

    from craft_core.pipeline.graph import plan_pipeline

    stage_dir = plan_pipeline(cfg)["assets"].stage_dir()
    shutil.copytree(teacher, stage_dir.begin() / "teacher")
    shutil.copytree(dataset, stage_dir.path / "datasets" / "task_a")
    stage_dir.commit({"teacher": str(stage_dir.path / "teacher")})


def test_layers_are_checked_against_an_already_built_teacher(tmp_path, tiny_pi0_fast, pusht_datasets):
    from tests.fixtures.data import FIXTURE_PUSHT_TASKS

    cfg = load_preset("smoke", [f"artifacts_root={tmp_path}", "cache.layers=[99]", "stages=[cache]"])
    with pytest.raises(PreflightError, match="stages=\\['cache'\\]: cache consumes assets, not selected"):  # not built yet
        preflight(cfg)
    _built_assets(cfg, tiny_pi0_fast, pusht_datasets[FIXTURE_PUSHT_TASKS[-1]]["root"])
    [line] = problems(cfg)
    assert line.startswith("cache.layers=[99]: the teacher's backbone has depth 2")
    preflight(load_preset("smoke", [f"artifacts_root={tmp_path}", "cache.layers=[-3, 2]", "stages=[cache]"]))


@pytest.mark.parametrize("fixture", ["tiny_pi0_fast", "tiny_smolvla"])
def test_config_depth_is_the_built_models_depth(request, fixture):
    from craft_core.demo.tiny.loading import tiny_spec_of
    from craft_core.policies import adapter_class, get_adapter
    from craft_core.policy_io import load_policy

    folder = request.getfixturevalue(fixture)
    config = json.loads((folder / "config.json").read_text())
    adapter = get_adapter(load_policy(str(folder)))
    assert adapter_class(config["type"]).config_depth(config, tiny_spec_of(folder)["sizes"]) == adapter.depth


def test_a_failed_stage_leaves_no_empty_directory_and_no_lock(tmp_path):
    stage_dir = StageDir(tmp_path, "cache", "f" * 16)

    def refuse(out_dir):
        raise ValueError("cache.layers: layer 99 is outside the backbone")

    with pytest.raises(ValueError):
        run_stage(stage_dir, refuse)
    assert list(tmp_path.iterdir()) == []

    def partial(out_dir):
        (out_dir / "anchors.zarr").mkdir()
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        run_stage(stage_dir, partial)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["f" * 16]  # kept to resume, no lock
    result, executed = run_stage(stage_dir, lambda out_dir: {"ok": 1})
    assert executed and result == {"ok": 1} and not stage_dir.lock_path.exists()


def test_input_errors_are_not_retried_transient_ones_are():
    from prefect.states import Failed

    from craft_core.store import AnchorStoreError
    from tasks.common import retry_transient

    def retried(exc) -> bool:
        return retry_transient(None, None, Failed(data=exc))

    assert not retried(ValueError("cache.layers=[99]"))
    assert not retried(AnchorStoreError("/s.zarr", "block 1 does not match its digest", "re-run the cache stage"))
    assert not retried(FileNotFoundError("meta/info.json"))
    assert not retried(StageProcessError("cache failed", input_error=True))
    assert retried(StageProcessError("cache process exited with code -9"))
    assert retried(RuntimeError("CUDA out of memory"))
    assert retried(ConnectionError("reset by peer"))
    assert is_input_error(PreflightError([]))
