"""craft_core.policy_io: loading tiny folders through lerobot's own from_pretrained/make_policy."""

import json
import shutil

import pytest
import torch

from craft_core.config import PolicySource
from craft_core.policy_io import (
    PolicyLoadError,
    load_policy,
    load_policy_config,
    make_processors,
    policy_loading_context,
    policy_type_of,
)
from craft_core.demo.tiny import tiny_spec_of


def pusht_observation(pusht_datasets, policy) -> dict:
    """One raw frame of the pusht fixture dataset as an inference batch (no action)."""
    from lerobot.datasets import LeRobotDataset

    from tests.fixtures.data import FIXTURE_PUSHT_TASKS

    entry = pusht_datasets[FIXTURE_PUSHT_TASKS[-1]]
    frame = LeRobotDataset(entry["repo_id"], root=entry["root"], video_backend="pyav")[0]
    keys = [*policy.config.input_features, "task"]
    return {key: frame[key] for key in keys if key in frame}


@pytest.mark.parametrize("fixture", ["tiny_pi0_fast", "tiny_smolvla"])
def test_tiny_folder_reloads_and_select_action_works(fixture, request, pusht_datasets):
    folder = request.getfixturevalue(fixture)
    assert policy_type_of(folder) == fixture.removeprefix("tiny_")
    policy = load_policy(PolicySource(path=str(folder)))  # the policy class's own from_pretrained
    assert not policy.training and not any(p.requires_grad for p in policy.parameters())
    preprocessor, postprocessor = make_processors(policy, pretrained_path=folder)
    policy.reset()
    with torch.no_grad():
        action = postprocessor(policy.select_action(preprocessor(pusht_observation(pusht_datasets, policy))))
    assert action.shape == (1, 2)
    assert torch.isfinite(action).all()


def test_make_policy_inside_the_loading_context_is_how_the_trainer_builds_a_student(tiny_pi0_fast, pusht_datasets):
    from lerobot.policies.factory import make_policy

    from tests.fixtures.data import FIXTURE_PUSHT_TASKS

    meta = pusht_datasets[FIXTURE_PUSHT_TASKS[0]]["meta"]
    cfg = load_policy_config(tiny_pi0_fast)
    assert str(cfg.pretrained_path) == str(tiny_pi0_fast)
    with policy_loading_context(tiny_pi0_fast) as spec:
        assert spec["policy_type"] == "pi0_fast"
        student = make_policy(cfg, ds_meta=meta)
    teacher = load_policy(tiny_pi0_fast, ds_meta=meta)
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    assert student_state.keys() == teacher_state.keys()
    assert all(torch.equal(student_state[k], teacher_state[k]) for k in teacher_state)
    trainable = load_policy(tiny_pi0_fast, ds_meta=meta, trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_checkpoint_of_a_tiny_student_loads_without_the_marker(tiny_pi0_fast, tmp_path):
    """A student saved with save_pretrained references the teacher's tokenizers: still tiny."""
    teacher = load_policy(tiny_pi0_fast)
    checkpoint = tmp_path / "pretrained_model"
    teacher.save_pretrained(checkpoint)
    assert not (checkpoint / "craft_tiny.json").exists()
    assert tiny_spec_of(checkpoint)["policy_type"] == "pi0_fast"
    reloaded = load_policy(checkpoint)
    assert torch.equal(
        reloaded.model.paligemma_with_expert.paligemma.lm_head.weight,
        teacher.model.paligemma_with_expert.paligemma.lm_head.weight,
    )


def test_moved_tiny_folder_uses_its_own_tokenizers(tiny_pi0_fast, tmp_path, pusht_datasets):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_pi0_fast, moved)
    # As if it had been built elsewhere: the recorded absolute tokenizer paths no longer exist.
    config = json.loads((moved / "config.json").read_text())
    for field in ("text_tokenizer_name", "action_tokenizer_name"):
        config[field] = str(tmp_path / "gone" / "tokenizers" / field)
    (moved / "config.json").write_text(json.dumps(config))
    policy = load_policy(moved)
    assert policy.config.text_tokenizer_name == str(moved / "tokenizers" / "text")
    assert policy.config.action_tokenizer_name == str(moved / "tokenizers" / "fast_action")
    preprocessor, _ = make_processors(policy, pretrained_path=moved)
    original = load_policy(tiny_pi0_fast)
    original_pre, _ = make_processors(original, pretrained_path=tiny_pi0_fast)
    observation = pusht_observation(pusht_datasets, policy)
    assert torch.equal(
        preprocessor(dict(observation))["observation.language.tokens"],
        original_pre(dict(observation))["observation.language.tokens"],
    )


def test_plain_folders_load_without_patching(tmp_path):
    from lerobot.policies import pi_gemma
    from lerobot.policies.pi0_fast import modeling_pi0_fast

    (tmp_path / "config.json").write_text(json.dumps({"type": "pi0_fast"}))
    with policy_loading_context(tmp_path) as spec:
        assert spec is None
        assert modeling_pi0_fast.PaliGemmaForConditionalGenerationWithPiGemma is pi_gemma.PaliGemmaForConditionalGenerationWithPiGemma
    with policy_loading_context("lerobot/pi0fast-base") as spec:  # hub ids are never tiny
        assert spec is None


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(PolicyLoadError, match="does not exist"):
        load_policy(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PolicyLoadError, match="is a file"):
        load_policy(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyLoadError, match="has no config.json"):
        load_policy(tmp_path / "empty")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"type": "not_a_policy"}))
    with pytest.raises(PolicyLoadError, match=r"'not_a_policy'.*known: \[.*'pi0_fast'"):
        load_policy(tmp_path / "alien")
    with pytest.raises(PolicyLoadError, match="HF_HUB_OFFLINE"):  # tests run offline
        policy_type_of("lerobot/surely-not-cached-here")


def test_weights_that_lerobot_fails_to_load_are_an_error(tiny_pi0_fast, tmp_path):
    """PI0FastPolicy.from_pretrained prints a warning and returns random weights; craft refuses."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pi0_fast, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(PolicyLoadError, match="were not loaded"):
        load_policy(broken)


def test_unknown_adapter_type_lists_supported_types(tiny_pi0_fast):
    from craft_core.policies import adapter_class, get_adapter

    with pytest.raises(ValueError, match=r"'act'.*supported: \[.*'pi0_fast'.*'smolvla'"):
        adapter_class("act")
    policy = load_policy(tiny_pi0_fast)
    assert get_adapter(policy).policy_type == "pi0_fast"


def test_hub_revision_is_honoured_for_config_and_weights(tiny_pi0_fast, tmp_path, monkeypatch):
    """A hub id is loaded from the snapshot of the requested revision (an offline hub cache here)."""
    import huggingface_hub.constants
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "hub" / "models--craft--tiny-pi0fast"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(tiny_pi0_fast, repo / "snapshots" / commit)
    weights = load_file(repo / "snapshots" / commits["v1"] / "model.safetensors")
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = weights[name] + 1.0
    save_file(weights, repo / "snapshots" / commits["v1"] / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    main = load_policy(PolicySource(path="craft/tiny-pi0fast"))
    v1 = load_policy(PolicySource(path="craft/tiny-pi0fast", revision="v1"))
    assert main.config.pretrained_path.endswith(commits["main"]) and v1.config.pretrained_path.endswith(commits["v1"])
    assert v1.config.pretrained_revision == "v1"
    key = name if name in v1.state_dict() else f"model.{name}"
    torch.testing.assert_close(v1.state_dict()[key], main.state_dict()[key] + 1.0)
