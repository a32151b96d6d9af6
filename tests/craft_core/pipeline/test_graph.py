"""The stage graph: what each stage's fingerprint depends on, and ${assets} resolution."""

import pytest

from craft_core.config import load_preset
from craft_core.pipeline import plan_pipeline, resolve_assets

UNITS = ["assets", "cache", "train_baseline", "train_craft", "eval_teacher", "eval_baseline", "eval_craft", "report"]
EVALS = {"eval_teacher", "eval_baseline", "eval_craft", "report"}


def _fingerprints(*overrides):
    return {stage: plan.fingerprint for stage, plan in plan_pipeline(load_preset("smoke", list(overrides))).items()}


def _changed(*overrides) -> set[str]:
    base, other = _fingerprints(), _fingerprints(*overrides)
    return {stage for stage in base if base[stage] != other[stage]}


def test_plan_order_dirs_and_keys(tmp_path):
    plans = plan_pipeline(load_preset("smoke", [f"artifacts_root={tmp_path}"]))
    assert list(plans) == UNITS
    for stage, plan in plans.items():
        assert plan.path == str(tmp_path / stage / plan.fingerprint)
        assert plan.fingerprint in plan.cache_key and stage in plan.cache_key
    assert plans["train_craft"].upstream == {"cache": plans["cache"].fingerprint, "assets": plans["assets"].fingerprint}
    assert plans["train_baseline"].upstream == {"assets": plans["assets"].fingerprint}  # no anchor cache
    # eval's slice names the teacher, which lives in the assets: a stage mentioning ${assets} consumes them.
    assert set(plans["eval_teacher"].upstream) == {"assets", "cache"}
    assert set(plans["eval_craft"].upstream) == {"assets", "cache", "train_craft"}
    assert set(plans["report"].upstream) == {"assets", "cache", "train_craft", "train_baseline", *EVALS - {"report"}}


def test_same_config_same_plan_and_other_root_other_cache_key(tmp_path):
    assert _fingerprints() == _fingerprints()
    a = plan_pipeline(load_preset("smoke", [f"artifacts_root={tmp_path / 'a'}"]))["cache"]
    b = plan_pipeline(load_preset("smoke", [f"artifacts_root={tmp_path / 'b'}"]))["cache"]
    assert a.fingerprint == b.fingerprint  # the content does not depend on where it is stored
    assert a.cache_key != b.cache_key  # but a cached reference must point into its own root


@pytest.mark.parametrize(
    "override, expected",
    [
        # tuning CRaFT re-runs CRaFT and eval, never the baseline or the cache
        ("train.retention.every_k=3", {"train_craft", "eval_craft", "report"}),
        ("train.retention.eps_end=0.001", {"train_craft", "eval_craft", "report"}),
        # a training change re-runs both training runs and their evaluations, not the teacher's
        ("train.steps=5", {"train_baseline", "train_craft", "eval_baseline", "eval_craft", "report"}),
        # a cache change re-runs everything that reads the store, but not the baseline's training
        ("cache.n_anchors=6", {"cache", "train_craft"} | EVALS),
        ("eval.drift_batch_size=4", EVALS),
        # the assets feed everything
        ("assets.seed=3", set(UNITS)),
        # non-semantic settings re-run nothing
        ("train.num_workers=2", set()),
        ("isolation=process", set()),
        ("stages=[eval]", set()),
    ],
)
def test_a_change_reruns_exactly_the_stages_that_depend_on_it(override, expected):
    assert _changed(override) == expected


def test_without_baseline_there_is_no_baseline_unit():
    plans = plan_pipeline(load_preset("smoke", ["runs={craft: {}}"]))
    assert "train_baseline" not in plans and "train_baseline" not in plans["report"].upstream


def test_every_run_is_its_own_stage_and_baselines_skip_the_cache():
    plans = plan_pipeline(load_preset("smoke", ["runs={plain: {retention: false}, craft: {}, craft_b: {}}"]))
    assert [stage for stage in plans if stage.startswith("train_")] == ["train_plain", "train_craft", "train_craft_b"]
    assert "cache" not in plans["train_plain"].upstream and "cache" in plans["train_craft_b"].upstream
    # Two retaining runs with the same settings are the same training: the same fingerprint content.
    assert plans["train_craft"].config == plans["train_craft_b"].config
    assert plans["train_plain"].config["train"]["retention"] is None


def test_resolve_assets_replaces_the_placeholder_only():
    cfg = load_preset("smoke")
    resolved = resolve_assets(cfg.cache, "/data/assets/abc")
    assert resolved.teacher.path == "/data/assets/abc/teacher"
    assert resolved.dataset.root == "/data/assets/abc/datasets/task_a"
    assert resolved.n_anchors == cfg.cache.n_anchors
    assert cfg.cache.teacher.path.startswith("${assets}")  # the original is untouched
    with pytest.raises(ValueError, match="assets"):
        resolve_assets(cfg.cache, None)
    hub = load_preset("pi0fast_aloha")
    assert resolve_assets(hub.cache, None) is hub.cache
