"""Loading lerobot policies and their processors: hub ids and local folders.

Everything goes through lerobot's own machinery (``PreTrainedConfig.from_pretrained``,
``make_policy`` / ``<Policy>.from_pretrained``, ``make_pre_post_processors``). craft adds:

- **revisions**: a hub id is materialised at its revision with ``snapshot_download`` and then
  loaded as a local folder, so config, weights and processors all come from that revision
  (pi0_fast's ``from_pretrained`` drops ``revision`` when it fetches its weights).
- **checks** with clear errors: missing folder, no ``config.json``, unknown policy type, and
  weights that lerobot failed to load (pi0_fast's ``from_pretrained`` only prints a warning and
  returns a randomly initialised model).
- **folder plugins**: folders that lerobot cannot load as they are (craft's tiny offline demo
  policies, whose backbone sizes lerobot hard-codes) are handled by plugins registered under the
  entry-point group ``craft.policy_folders`` (see pyproject.toml). A plugin says whether it
  recognises a folder and then supplies the context to load it in, config and processor
  overrides, and the files a checkpoint saved from it must carry. Hub checkpoints and ordinary
  folders match no plugin and load exactly as lerobot loads them. This module imports no plugin.

Loading a teacher (frozen) and building a student (trainable copy) — the pattern for every stage::

    from craft_core.policy_io import load_policy, make_processors

    teacher = load_policy(source, ds_meta=meta, device=device)   # eval mode, requires_grad off
    # the teacher's saved processors (its normalisation stats, tokenizers):
    preprocessor, postprocessor = make_processors(teacher, pretrained_path=teacher.config.pretrained_path)
    student = load_policy(source, ds_meta=meta, device=device, trainable=True)
    # fine-tuning normalises with the task dataset's stats, as lerobot_train does:
    preprocessor, postprocessor = make_processors(
        student, dataset_stats=meta.stats, pretrained_path=student.config.pretrained_path)

    # or with lerobot's factory directly (what lerobot_train does), inside the loading context:
    from lerobot.policies.factory import make_policy
    cfg = load_policy_config(source)     # pretrained_path = local folder (hub snapshot)
    with policy_loading_context(cfg.pretrained_path):
        student = make_policy(cfg, ds_meta=meta)
"""

import copy
import functools
import json
import math
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from craft_core.config import PolicySource

CONFIG_NAME = "config.json"
PREPROCESSOR_CONFIG = "policy_preprocessor.json"

PLUGIN_GROUP = "craft.policy_folders"


class PolicyFolderPlugin(Protocol):
    """How a kind of local policy folder that lerobot cannot load as it is gets loaded."""

    name: str

    def recognises(self, folder: Path) -> bool: ...

    def loading_context(self, folder: Path): ...  # a context manager

    def config_overrides(self, folder: Path, config: Any) -> dict[str, Any]: ...

    def processor_overrides(self, folder: Path, config: Any) -> dict[str, dict]: ...

    def carry_files(self, source_folder: Path, pretrained_dir: Path) -> None: ...


@functools.cache
def folder_plugins() -> tuple[PolicyFolderPlugin, ...]:
    """The installed ``craft.policy_folders`` plugins (entry points), loaded once."""
    return tuple(entry.load() for entry in entry_points(group=PLUGIN_GROUP))


def folder_plugin(path: str | Path | None) -> PolicyFolderPlugin | None:
    """The plugin that recognises the local folder ``path``, or None (hub ids, ordinary folders)."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    for plugin in folder_plugins():
        if plugin.recognises(folder):
            return plugin
    return None


class PolicyLoadError(RuntimeError):
    """A policy source that cannot be loaded, with what is wrong and what to do."""


def _as_source(source: PolicySource | str | Path) -> PolicySource:
    if isinstance(source, PolicySource):
        return source
    return PolicySource(path=str(source))


def _looks_local(path: str) -> bool:
    # A hub repo id is exactly "owner/name"; anything else (absolute, ./, ~, more segments) is a path.
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def _local_folder(path: str) -> Path | None:
    """The local folder of ``path``, None for a hub id; raises when a local path is unusable."""
    if not _looks_local(path):
        return None
    folder = Path(path).expanduser().absolute()
    if not folder.exists():
        raise PolicyLoadError(
            f"policy folder {folder} does not exist; pass a folder written by save_pretrained "
            "(config.json + model.safetensors) or a hub repo id such as 'lerobot/pi0fast-base'"
        )
    if not folder.is_dir():
        raise PolicyLoadError(f"policy path {folder} is a file, not a folder; pass the folder that holds config.json")
    if not (folder / CONFIG_NAME).is_file():
        raise PolicyLoadError(
            f"policy folder {folder} has no {CONFIG_NAME}; pass the 'pretrained_model' folder of a "
            "checkpoint (the one save_pretrained wrote)"
        )
    return folder


def _read_config_json(source: PolicySource) -> dict:
    folder = _local_folder(source.path)
    if folder is not None:
        return json.loads((folder / CONFIG_NAME).read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source.path, CONFIG_NAME, revision=source.revision)).read_text())
    except Exception as exc:  # offline, missing repo, missing file: all mean "cannot read its config"
        raise PolicyLoadError(
            f"{source.path!r} is not a local folder and its {CONFIG_NAME} cannot be read from the hub "
            f"(revision {source.revision!r}): {exc}. Offline (HF_HUB_OFFLINE=1) only local folders and "
            "cached repos work."
        ) from exc


def policy_type_of(source: PolicySource | str | Path) -> str:
    """The lerobot policy type (``config.json``'s ``type``) of a hub id or local folder."""
    source = _as_source(source)
    policy_type = _read_config_json(source).get("type")
    if not policy_type:
        raise PolicyLoadError(f"{CONFIG_NAME} of {source.path} has no 'type' field; it is not a lerobot policy")
    return policy_type


@contextmanager
def policy_loading_context(path: str | Path | PolicySource | None) -> Iterator[Any]:
    """The context a folder must be built/loaded in: its plugin's (yielding what the plugin's context
    yields, e.g. a tiny folder's spec), or none (yielding None) for hub ids and ordinary folders."""
    if isinstance(path, PolicySource):
        path = path.path
    plugin = folder_plugin(path)
    if plugin is None:
        yield None
        return
    with plugin.loading_context(Path(path).expanduser()) as value:
        yield value


def carry_plugin_files(source_folder: str | Path | None, pretrained_dir: Path) -> None:
    """Copy what a checkpoint saved from ``source_folder``'s policy needs to load on its own."""
    plugin = folder_plugin(source_folder)
    if plugin is not None:
        plugin.carry_files(Path(source_folder), Path(pretrained_dir))


def load_policy_config(source: PolicySource | str | Path):
    """The policy's ``PreTrainedConfig``, ``pretrained_path`` set to a local folder.

    A hub id is materialised with ``snapshot_download(repo_id, revision=...)`` first, so that
    lerobot's loaders then read config, weights and processors of that revision (pi0_fast's
    ``from_pretrained`` drops ``revision`` when it fetches ``model.safetensors``).
    ``pretrained_revision`` keeps the requested revision. A plugin folder gets its plugin's
    config overrides (a moved tiny folder's tokenizer paths).
    """
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class  # noqa: F401  (registers every config class)

    source = _as_source(source)
    folder = _local_folder(source.path)
    policy_type = policy_type_of(source)
    known = PreTrainedConfig.get_known_choices()
    if policy_type not in known:
        raise PolicyLoadError(
            f"policy type {policy_type!r} of {source.path} is not a lerobot policy type; known: {sorted(known)}"
        )
    if folder is None:
        folder = _hub_snapshot(source)
    cfg = PreTrainedConfig.from_pretrained(str(folder))
    cfg.pretrained_path = str(folder)
    if hasattr(cfg, "pretrained_revision"):
        cfg.pretrained_revision = source.revision
    plugin = folder_plugin(folder)
    if plugin is not None:
        try:
            overrides = plugin.config_overrides(folder, cfg)
        except FileNotFoundError as exc:
            raise PolicyLoadError(str(exc)) from exc
        for field, value in overrides.items():
            setattr(cfg, field, value)
    return cfg


def load_policy(
    source: PolicySource | str | Path,
    *,
    ds_meta=None,
    device: str | torch.device = "cpu",
    trainable: bool = False,
    options: dict | None = None,
    rename_map: dict[str, str] | None = None,
):
    """Load a pretrained lerobot policy (hub id or local folder) onto ``device``.

    Goes through ``load_policy_config`` (hub ids materialised at their revision), then with
    ``ds_meta`` through lerobot's ``make_policy(cfg, ds_meta=..., rename_map=...)`` (output
    features from the dataset, as lerobot_train does), without through the policy class's
    ``from_pretrained``. ``options`` (``train.policy``) set fields of the lerobot config first.
    Returns the policy in eval mode with gradients off unless ``trainable``. A trainable policy
    whose config freezes something (``train_expert_only``, ``freeze_vision_encoder``) keeps
    lerobot's own freezing, as lerobot-train does; otherwise every parameter trains.

    A PEFT checkpoint (``use_peft`` in its config, ``adapter_config.json`` beside it: what a
    ``train.peft`` run saves, as lerobot saves PEFT runs) is its base policy plus the adapters:
    trainable it comes back as the ``PeftModel`` (resume), frozen with the adapters merged into a
    plain policy (evaluation).
    """
    from craft_core.policy_options import apply_policy_options, freezes_anything

    cfg = load_policy_config(source)
    apply_policy_options(cfg, options)
    folder = Path(cfg.pretrained_path)
    cfg.device = str(device)
    if getattr(cfg, "use_peft", False):
        return _load_peft_checkpoint(cfg, folder, ds_meta=ds_meta, device=device, trainable=trainable,
                                     rename_map=rename_map)
    policy = _build_from_folder(cfg, folder, ds_meta=ds_meta, device=device, rename_map=rename_map)
    policy.train(trainable)
    if not trainable:
        policy.requires_grad_(False)
    elif not freezes_anything(policy.config):
        policy.requires_grad_(True)
    return policy


def _build_from_folder(cfg, folder: Path, *, ds_meta, device, rename_map=None):
    """The lerobot policy of ``cfg`` with the weights of ``folder``, checked to have loaded them all."""
    from lerobot.policies.factory import get_policy_class, make_policy

    from craft_core.noise import quiet_prints

    with policy_loading_context(folder), quiet_prints():  # lerobot's load banner and chatter: noise.py
        if ds_meta is not None:
            policy = make_policy(cfg, ds_meta=ds_meta, rename_map=rename_map or None)
        else:
            policy = get_policy_class(cfg.type).from_pretrained(str(folder), config=cfg)
    policy.to(device)
    _check_weights_loaded(policy, folder)
    return policy


def _load_peft_checkpoint(cfg, folder: Path, *, ds_meta, device, trainable: bool, rename_map=None):
    """The base policy named by the adapter config, with the adapters of ``folder`` on top."""
    from peft import PeftConfig, PeftModel

    adapter_cfg = PeftConfig.from_pretrained(str(folder))
    base_path = adapter_cfg.base_model_name_or_path
    if not base_path:
        raise PolicyLoadError(f"PEFT checkpoint {folder}: adapter_config.json names no base policy "
                              "(base_model_name_or_path)")
    base_folder = Path(load_policy_config(PolicySource(path=base_path, revision=adapter_cfg.revision)).pretrained_path)
    # The fine-tuned run's settings (train.policy options, features) with the base's weights.
    base_cfg = copy.copy(cfg)
    base_cfg.pretrained_path = str(base_folder)
    base_cfg.use_peft = False
    base_cfg.device = str(device)
    base = _build_from_folder(base_cfg, base_folder, ds_meta=ds_meta, device=device, rename_map=rename_map)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    model.to(device)
    if trainable:
        model.train(True)
        return model
    policy = model.merge_and_unload()
    policy.config.use_peft = False
    policy.config.pretrained_path = str(folder)
    policy.eval()
    policy.requires_grad_(False)
    return policy


def _hub_snapshot(source: PolicySource) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.path, revision=source.revision))
    except Exception as exc:  # offline and not cached, unknown repo or revision
        raise PolicyLoadError(
            f"cannot fetch hub policy {source.path!r} (revision {source.revision!r}): {exc}. "
            "Offline (HF_HUB_OFFLINE=1) only local folders and cached repos work."
        ) from exc


def _check_weights_loaded(policy: torch.nn.Module, folder: Path) -> None:
    """Fail loudly when lerobot silently fell back to random weights (pi0_fast does that)."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    if not weights.is_file() and (folder / "adapter_config.json").is_file():
        return  # a PEFT checkpoint: its base's weights were checked when the base was loaded
    if not weights.is_file():
        raise PolicyLoadError(f"policy folder {folder} has no model.safetensors; it holds no trained weights")
    state = policy.state_dict()
    with safe_open(str(weights), framework="pt") as stored:
        # Weight matrices only (norms initialise to constants and would match even when nothing
        # loaded), a few small ones spread over the model so a multi-GB checkpoint costs nothing.
        shapes = {key: stored.get_slice(key).get_shape() for key in stored.keys()}
        matrices = [key for key, shape in shapes.items() if len(shape) >= 2 and math.prod(shape) <= 2**22]
        for key in matrices[:: max(1, len(matrices) // 4)]:
            ours = state.get(key, state.get(f"model.{key}"))
            if ours is None:
                continue
            saved = stored.get_tensor(key)
            if tuple(ours.shape) != tuple(saved.shape) or not torch.equal(ours.detach().cpu().to(saved.dtype), saved):
                raise PolicyLoadError(
                    f"weights of {folder} were not loaded into the {policy.config.type} policy (parameter {key} "
                    "differs from model.safetensors); lerobot printed why above — usually a config.json that "
                    "does not match the weights"
                )


def make_processors(policy, *, dataset_stats: dict | None = None, pretrained_path: str | Path | None = None,
                    rename_map: dict[str, str] | None = None):
    """The policy's (preprocessor, postprocessor) through lerobot's ``make_pre_post_processors``.

    With ``pretrained_path`` the saved pipelines are loaded (as lerobot_eval / lerobot_train do),
    on the policy's device and features; ``dataset_stats``, when given, replaces the saved
    normalisation statistics (lerobot_train does the same when fine-tuning on a new dataset).
    Without it, fresh pipelines are built from the policy config and ``dataset_stats``.
    ``rename_map`` (lerobot's) renames dataset observation keys to the policy's in the preprocessor.
    """
    from lerobot.policies.factory import make_pre_post_processors

    cfg = policy.config
    device = str(next(policy.parameters()).device)
    if pretrained_path is None:
        if rename_map:
            raise ValueError("make_processors: rename_map needs the saved pipelines (pretrained_path)")
        if dataset_stats is None:
            raise ValueError(
                "make_processors needs dataset_stats (to build fresh processors) or pretrained_path (to load the "
                "saved ones, e.g. the folder the policy was loaded from)"
            )
        with policy_loading_context(cfg.pretrained_path if cfg.pretrained_path else None):
            return make_pre_post_processors(cfg, dataset_stats=dataset_stats)

    pretrained_path = str(pretrained_path)
    folder = _local_folder(pretrained_path)
    if folder is not None and not (folder / PREPROCESSOR_CONFIG).is_file():
        raise PolicyLoadError(
            f"policy folder {folder} has no {PREPROCESSOR_CONFIG}; pass dataset_stats and no pretrained_path to "
            "build fresh processors from the policy config"
        )
    features = {**cfg.input_features, **cfg.output_features}
    pre_overrides: dict[str, dict] = {
        "device_processor": {"device": device},
        "normalizer_processor": {"features": features, "norm_map": cfg.normalization_mapping},
    }
    post_overrides: dict[str, dict] = {
        "unnormalizer_processor": {"features": cfg.output_features, "norm_map": cfg.normalization_mapping},
    }
    if rename_map:
        pre_overrides["rename_observations_processor"] = {"rename_map": dict(rename_map)}
    if dataset_stats is not None:
        pre_overrides["normalizer_processor"]["stats"] = dataset_stats
        post_overrides["unnormalizer_processor"]["stats"] = dataset_stats
    plugin = folder_plugin(folder)
    if plugin is not None:
        for step, fields in plugin.processor_overrides(folder, cfg).items():
            pre_overrides.setdefault(step, {}).update(fields)
    # Plugin processors may resolve tokenizers inside the loading context (tiny pi0's PaliGemma name).
    with policy_loading_context(folder):
        return make_pre_post_processors(
            cfg,
            pretrained_path=pretrained_path,
            pretrained_revision=getattr(cfg, "pretrained_revision", None),
            preprocessor_overrides=pre_overrides,
            postprocessor_overrides=post_overrides,
        )
