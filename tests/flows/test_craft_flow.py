"""The flow module: its command line, its parameter, and stage subsets against missing outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from craft_core.config import PipelineConfig, load_preset
from craft_core.pipeline.fingerprint import IncompleteStageError
from flows.craft_flow import DEFAULT_PRESET, config_from_args, craft, parse_args

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_no_arguments_is_the_demo_preset():
    assert config_from_args(parse_args([])) == load_preset(DEFAULT_PRESET) == load_preset("demo")


def test_preset_overrides_sets_and_stage_subset():
    cfg = config_from_args(parse_args(["--preset", "smoke", "train.steps=3", "--set", "cache.n_anchors=4",
                                       "--stages", "cache,train"]))
    assert (cfg.name, cfg.train.steps, cfg.cache.n_anchors, cfg.stages) == ("craft-smoke", 3, 4, ["cache", "train"])


def test_config_file_and_bad_stage_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((REPO_ROOT / "configs" / "smoke.yaml").read_text())
    assert config_from_args(parse_args(["--config", str(path)])) == load_preset("smoke")
    with pytest.raises(Exception, match="stages"):
        config_from_args(parse_args(["--config", str(path), "--stages", "cache,deploy"]))


def test_flow_parameter_is_the_pipeline_config():
    assert craft.name == "craft"
    schema = craft.parameters.model_dump()
    assert list(schema["properties"]) == ["config"]
    assert "PipelineConfig" in json.dumps(schema["definitions"])
    default = craft.fn.__defaults__[0]
    assert isinstance(default, PipelineConfig) and default == load_preset("demo")


def test_print_params_round_trips_into_the_flow_parameter():
    result = subprocess.run([sys.executable, "flows/craft_flow.py", "--preset", "smoke", "train.steps=2",
                             "--print-params"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout.strip().splitlines()[-1])
    assert PipelineConfig.model_validate(params["config"]) == load_preset("smoke", ["train.steps=2"])


def test_subset_without_upstream_outputs_names_the_missing_stage(tmp_path):
    cfg = load_preset("smoke", [f"artifacts_root={tmp_path}", "stages=[train]"])
    with pytest.raises(IncompleteStageError, match=r"stage 'assets' has no complete output .* include 'assets'"):
        craft.fn(cfg)
    assert not any(tmp_path.rglob("manifest.json"))
