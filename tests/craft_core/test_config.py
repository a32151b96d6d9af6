"""Pipeline config: presets validate, overrides apply, bad input is rejected with the field named."""

import pytest
import yaml
from pydantic import ValidationError

from craft_core.config import PRESETS_DIR, PipelineConfig, load_config, load_preset

# The required pipeline presets; every YAML directly in configs/ is a pipeline preset (the retention
# experiment's own settings live in configs/experiments/).
PRESETS = ["demo", "smoke", "pi0fast_libero", "pi0fast_libero_lora", "pi0fast_aloha"]
ALL_PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_required_presets_exist():
    assert set(PRESETS) <= set(ALL_PRESETS)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_presets_validate(name):
    cfg = load_preset(name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.steps >= 1


def test_offline_presets_use_local_assets_and_cpu():
    for name in ("demo", "smoke"):
        cfg = load_preset(name)
        assert cfg.assets is not None
        assert cfg.cache.teacher.path.startswith("${assets}")
        assert cfg.cache.dataset.root.startswith("${assets}")
        assert cfg.train.dataset.root.startswith("${assets}")
        assert {cfg.cache.device, cfg.train.device, cfg.eval.device} == {"cpu"}


def test_gpu_presets_use_hub_pi0fast_checkpoints():
    # LIBERO: a teacher that already solves the suites to retain (pi0fast-base scores ~0 % there).
    teachers = {"pi0fast_libero": "lerobot/pi0fast-libero", "pi0fast_libero_lora": "lerobot/pi0fast-libero",
                "pi0fast_aloha": "lerobot/pi0fast-base"}
    for name, teacher in teachers.items():
        cfg = load_preset(name)
        assert cfg.assets is None
        assert cfg.cache.teacher.path == teacher
        assert cfg.cache.dataset.root is None and cfg.train.dataset.root is None
        assert cfg.eval.sim, "the real presets evaluate in simulation"


def test_overrides_are_applied_and_yaml_parsed():
    cfg = load_preset("smoke", ["train.steps=7", "train.retention.every_k=3", "cache.layers=[-1]",
                                "runs.craft.retention=false", "eval.drift=no"])
    assert cfg.train.steps == 7
    assert cfg.train.retention.every_k == 3
    assert cfg.cache.layers == [-1]
    assert cfg.runs["craft"].retention is False and cfg.run_train_config("craft").retention is None
    assert cfg.eval.drift is False


def test_override_creates_missing_section(tmp_path):
    base = yaml.safe_load((PRESETS_DIR / "smoke.yaml").read_text())
    del base["train"]["retention"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(path, ["train.retention.lambda_max=3.5"])
    assert cfg.train.retention.lambda_max == 3.5


def _error_locations(exc: ValidationError) -> list[tuple]:
    return [tuple(err["loc"]) for err in exc.errors()]


@pytest.mark.parametrize(
    "override, location",
    [
        ("train.retention.every_kk=2", ("train", "retention", "every_kk")),
        ("cache.n_anchor=5", ("cache", "n_anchor")),
        ("typo_section=1", ("typo_section",)),
    ],
)
def test_unknown_keys_rejected_with_the_field_named(override, location):
    with pytest.raises(ValidationError) as info:
        load_preset("smoke", [override])
    assert location in _error_locations(info.value)
    assert location[-1] in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.retention.eps_start=0.01", "train.retention.eps_end=0.05"], "eps_start"),
        (["train.retention.every_k=0"], "every_k"),
        (["train.retention.lambda_max=0"], "lambda_max"),
        (["train.retention.lambda_init=20", "train.retention.lambda_max=10"], "lambda_init"),
        (["cache.layers=[-1, -1]"], "layers"),
        (["cache.pooling=[prefix_mean, prefix_mean]"], "pooling"),
        (["cache.pooling=[max_pool]"], "pooling"),
        (["stages=[cache, cache]"], "stages"),
        (["stages=[deploy]"], "stages"),
        (["assets.task_a=fly"], "task_a"),
        (["isolation=sometimes"], "isolation"),
    ],
)
def test_cross_field_and_range_checks(overrides, message):
    with pytest.raises(ValidationError) as info:
        load_preset("smoke", overrides)
    assert message in str(info.value)


def test_assets_placeholder_requires_assets_section(tmp_path):
    data = yaml.safe_load((PRESETS_DIR / "smoke.yaml").read_text())
    del data["assets"]
    path = tmp_path / "no_assets.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValidationError, match=r"\$\{assets\}"):
        load_config(path)


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ValueError, match="section.field=value"):
        load_preset("smoke", ["train.steps"])
    with pytest.raises(FileNotFoundError, match="known presets"):
        load_preset("no_such_preset")


def test_config_round_trips_through_json():
    """The flow parameter travels as JSON (deployment runs): it must come back identical."""
    cfg = load_preset("demo")
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg
