"""Tiny offline instances of the real lerobot classes: folder layout, confined patching, tokenizers."""

import json

import pytest
import torch

from craft_core.demo.tiny import TINY_MARKER, build_tiny_policy, supported_tiny_policy_types, tiny_lerobot_models
from tests.fixtures.policies import policy_test_batch


def test_unknown_policy_type_is_refused_with_the_supported_list(tmp_path):
    with pytest.raises(ValueError, match=r"'act'.*supported: \[.*'pi0_fast'.*'smolvla'"):
        build_tiny_policy("act", tmp_path / "policy", ds_meta=None)
    assert not (tmp_path / "policy").exists()
    assert {"pi0_fast", "smolvla"} <= set(supported_tiny_policy_types())


def test_non_empty_out_dir_is_refused(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_policy("pi0_fast", tmp_path, ds_meta=None)


def test_unknown_override_names_the_knob(tmp_path, policy_test_dataset):
    with pytest.raises(ValueError, match="unknown tiny pi0_fast override 'hidden_sise'"):
        build_tiny_policy("pi0_fast", tmp_path / "p", ds_meta=policy_test_dataset[2], hidden_sise=32)
    assert not (tmp_path / "p").exists()  # no half-written folder left behind


@pytest.mark.parametrize("fixture", ["tiny_pi0_fast_two_cameras", "tiny_smolvla_two_cameras"])
def test_tiny_folder_is_a_lerobot_checkpoint_marked_tiny(fixture, request):
    folder = request.getfixturevalue(fixture)
    for name in ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"):
        assert (folder / name).is_file(), name
    spec = json.loads((folder / TINY_MARKER).read_text())
    config = json.loads((folder / "config.json").read_text())
    assert spec["policy_type"] == config["type"] == fixture.removeprefix("tiny_").removesuffix("_two_cameras")
    assert spec["sizes"]["num_hidden_layers"] >= 2 and spec["why_patched"]
    assert 0 < spec["n_parameters"] < 2_000_000
    # Tokenizers live inside the folder and config.json references them there.
    for field, relative in spec["tokenizers"].items():
        assert config[field] == str(folder / relative)
        assert (folder / relative).is_dir()


def test_patching_is_confined_to_the_context_manager(tiny_pi0_fast_two_cameras):
    from lerobot.policies import pi_gemma
    from lerobot.policies.pi0_fast import modeling_pi0_fast

    name = "PaliGemmaForConditionalGenerationWithPiGemma"
    real = getattr(pi_gemma, name)
    assert getattr(modeling_pi0_fast, name) is real  # built already (fixture), nothing left patched
    spec = json.loads((tiny_pi0_fast_two_cameras / TINY_MARKER).read_text())
    with tiny_lerobot_models(spec):
        patched = getattr(modeling_pi0_fast, name)
        assert patched is not real
        with tiny_lerobot_models(dict(spec)):  # re-entered for the same folder: no second layer
            assert getattr(modeling_pi0_fast, name) is patched
        assert getattr(modeling_pi0_fast, name) is patched
    assert getattr(modeling_pi0_fast, name) is real
    with pytest.raises(ValueError, match="policy_type"):
        with tiny_lerobot_models({"sizes": {}}):
            pass


def test_loaded_tiny_pi0_fast_has_the_tiny_sizes(tiny_pi0_fast_two_cameras):
    from craft_core.policy_io import load_policy

    spec = json.loads((tiny_pi0_fast_two_cameras / TINY_MARKER).read_text())
    policy = load_policy(tiny_pi0_fast_two_cameras)
    paligemma = policy.model.paligemma_with_expert.paligemma
    text = paligemma.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (
        spec["sizes"]["hidden_size"],
        spec["sizes"]["num_hidden_layers"],
        spec["sizes"]["vocab_size"],
    )
    assert paligemma.config.vision_config.image_size == spec["sizes"]["image_size"]
    assert sum(p.numel() for p in policy.parameters()) == spec["n_parameters"]


def test_fast_action_tokens_decode_back_through_lerobot(tiny_pi0_fast_two_cameras, policy_test_dataset):
    """lerobot's own ActionTokenizerProcessorStep encodes, PI0FastPolicy.detokenize_actions decodes."""
    from craft_core.policy_io import load_policy, make_processors

    policy = load_policy(tiny_pi0_fast_two_cameras)
    preprocessor, _ = make_processors(policy, pretrained_path=tiny_pi0_fast_two_cameras)
    batch = preprocessor(policy_test_batch(policy_test_dataset, policy))
    tokens = batch["action.tokens"]
    end = policy._paligemma_tokenizer.convert_tokens_to_ids("|")
    assert all(end in row.tolist() for row in tokens), "every action sequence ends with the bare '|' token"
    # Generated sequences start after <bos>: decode what the model is trained to produce.
    decoded = policy.detokenize_actions(tokens[:, 1:], action_horizon=policy.config.chunk_size, action_dim=2)
    scale = policy.action_tokenizer.scale
    assert decoded.shape == batch["action"].shape
    assert (decoded - batch["action"]).abs().max() < 2.0 / scale  # rounding of DCT coefficients
    assert not torch.allclose(decoded, torch.zeros_like(decoded))
