"""The deployment path end to end, as a user runs it: a real ``prefect server start`` on 127.0.0.1
(free port, private PREFECT_HOME), a process work pool, ``prefect deploy`` of deployments/prefect.yaml,
a worker, and ``prefect deployment run craft/full`` with the ``smoke`` preset, twice.

The first run executes every stage for real (tiny pi0_fast, gym-pusht); the second must be
entirely Cached, because every stage's Prefect cache key is its content fingerprint.
"""

import json

import pytest

from craft_core.config import load_preset
from craft_core.pipeline.fingerprint import StageDir
from deployments.local_stack import LocalPrefect

STAGE_UNITS = {"assets", "cache", "train_baseline", "train_craft", "eval_teacher", "eval_baseline", "eval_craft",
               "report"}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_full_smoke_runs_then_is_cached(tmp_path):
    config = load_preset("smoke", [f"artifacts_root={tmp_path / 'artifacts'}"])
    params = {"config": config.model_dump(mode="json")}
    stack = LocalPrefect(tmp_path / "prefect-home", extra_env={"OMP_NUM_THREADS": "1"})
    try:
        stack.start_server()
        stack.deploy("full")
        deployment = stack.api("GET", "/deployments/name/craft/full")
        assert deployment["entrypoint"] == "flows/craft_flow.py:craft"
        assert "config" in deployment["parameter_openapi_schema"]["properties"]

        # Prefect validates the parameter against PipelineConfig at run creation, naming the field.
        bad = json.loads(json.dumps(params))
        bad["config"]["train"]["retention"]["every_kk"] = 2
        rejected = stack.prefect("deployment", "run", "craft/full", "--params", json.dumps(bad), check=False)
        assert rejected.returncode != 0
        assert "every_kk" in rejected.stdout + rejected.stderr

        stack.start_worker()
        first_id = stack.run_deployment(params)
        first = stack.wait_flow_run(first_id)
        assert first["state_type"] == "COMPLETED", (first["state"], stack.log("worker")[-6000:])
        first_tasks = stack.task_runs(first_id)
        assert set(first_tasks) == STAGE_UNITS
        assert {name: run["state_name"] for name, run in first_tasks.items()} == {s: "Completed" for s in STAGE_UNITS}

        # Every stage left exactly one complete content-addressed output.
        for stage in STAGE_UNITS:
            outputs = [p for p in (tmp_path / "artifacts" / stage).iterdir() if p.is_dir()]
            assert len(outputs) == 1 and StageDir(tmp_path / "artifacts", stage, outputs[0].name).is_complete()

        # Keystone through the flow: at CRaFT's first logged step the student is still the teacher,
        # so every target's retention loss is ~0 (float32 store).
        craft_dir = next(p for p in (tmp_path / "artifacts" / "train_craft").iterdir() if p.is_dir())
        first_record = json.loads((craft_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert first_record["retention_step"]
        for target in config.cache.targets:
            assert first_record[f"retention_loss/{target}"] <= 1e-6, target

        report = stack.latest_artifact("craft-report")
        assert report["type"] == "markdown" and report["data"].startswith("# craft report: craft-smoke")
        assert report["flow_run_id"] == first_id
        comparison = json.loads(stack.latest_artifact("craft-comparison")["data"])
        assert {row["run"] for row in comparison} == {"teacher", "baseline", "craft"}
        assert all("drift action_output" in row for row in comparison)  # drift for every target
        progress = stack.latest_artifact("craft-train-craft-progress")
        assert progress["type"] == "progress" and float(progress["data"]) == pytest.approx(100.0)
        for stage in STAGE_UNITS:
            summary = stack.latest_artifact(f"craft-{stage.replace('_', '-')}-summary")
            assert "executed" in summary["data"]

        second_id = stack.run_deployment(params)
        second = stack.wait_flow_run(second_id)
        assert second["state_type"] == "COMPLETED", (second["state"], stack.log("worker")[-6000:])
        second_tasks = stack.task_runs(second_id)
        assert {name: run["state_name"] for name, run in second_tasks.items()} == {s: "Cached" for s in STAGE_UNITS}
    finally:
        started = list(stack.processes.values())
        stack.stop()
    assert started and all(process.poll() is not None for process in started)
