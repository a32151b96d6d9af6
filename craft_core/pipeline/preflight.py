"""Pre-flight: check what the selected stages consume before any stage runs, and write nothing.

A config that validates can still name a dataset folder that is not there, a teacher that is not
cached offline, layers the teacher does not have, a device this machine lacks or an artifacts root
it cannot write. Each of those used to surface only when its stage ran (after the stages before
it, after a Prefect retry, as a chained traceback). :func:`preflight` finds them up front and
raises one :class:`PreflightError` whose message has one line per problem: the config field, its
value, the cause and the fix.

Only what the selected stages (``config.stages``) consume is checked: ``--stages assets,cache``
checks neither the training dataset nor the eval device. A value under ``${assets}`` is checked
once the assets stage's output exists (a local teacher folder already built); before that the
assets stage is what makes it, and the stage itself refuses a bad value (leaving no directory).

Checks run cheapest first; the plan-based ones (values under ``${assets}``, outputs of stages that
are consumed but not selected) import every stage's code, so they run only when the cheap ones
passed. Nothing here imports Prefect or writes a file.
"""

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_core.config import DatasetSource, PipelineConfig, PolicySource

ASSETS_PLACEHOLDER = "${assets}"
SECTIONS = ("assets", "cache", "train", "eval")
TEACHER_FIELD = "cache.teacher.path"


@dataclass(frozen=True)
class Problem:
    """One config value that would make a stage fail."""

    field: str
    value: Any
    cause: str
    fix: str

    def line(self) -> str:
        return f"{self.field}={self.value!r}: {self.cause}; fix: {self.fix}"


@dataclass(frozen=True)
class Refusal:
    """A problem whose message already names the field, the cause and the fix (scale-out checks)."""

    message: str

    def line(self) -> str:
        return self.message


class PreflightError(ValueError):
    """Config values that would make a stage fail; the message is one line per problem."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(problem.line() for problem in self.problems))


def preflight(cfg: PipelineConfig, *, check_upstream: bool = True) -> None:
    """Raise :class:`PreflightError` if a selected stage would fail on its inputs; writes nothing.

    ``check_upstream``: also require a complete output of every stage a selected stage consumes
    but that is not selected (the flow itself reports those as ``IncompleteStageError``).
    """
    selected = set(cfg.stages)
    problems = _artifacts_root(cfg) + _devices(cfg, selected)
    teacher = _teacher_needed(cfg, selected)
    if teacher is not None:
        problems += _teacher(cfg, teacher, assets_dir=None)
    for field, source in _datasets(cfg, selected):
        problems += _dataset(field, source, assets_dir=None)
    problems += _scale_out(cfg)
    if problems:
        raise PreflightError(problems)
    # Planning imports every stage's code: only when a stage is consumed without being selected, or
    # when values under ${assets} may already be built (the assets stage has a folder).
    present = {section for section in SECTIONS if getattr(cfg, section, None) is not None}
    check_upstream = check_upstream and not present <= selected
    assets_built = _uses_assets(cfg, selected, teacher) and (Path(cfg.artifacts_root).expanduser() / "assets").is_dir()
    if not (check_upstream or assets_built):
        return
    from craft_core.pipeline.graph import plan_pipeline

    plans = plan_pipeline(cfg)
    if check_upstream:
        problems += _upstream(cfg, plans)
    assets = plans.get("assets")
    if assets is not None and assets.stage_dir().is_complete():  # built: check what it built
        if teacher is not None and ASSETS_PLACEHOLDER in teacher.path:
            problems += _teacher(cfg, teacher, assets_dir=assets.path)
        for field, source in _datasets(cfg, selected):
            if ASSETS_PLACEHOLDER in (source.root or ""):
                problems += _dataset(field, source, assets_dir=assets.path)
    if problems:
        raise PreflightError(problems)


# ---------------------------------------------------------------------------- what is consumed


def _teacher_needed(cfg: PipelineConfig, selected: set[str]) -> PolicySource | None:
    # The cache stage runs the teacher, train starts from it, eval rolls it out.
    return cfg.cache.teacher if selected & {"cache", "train", "eval"} else None


def _datasets(cfg: PipelineConfig, selected: set[str]) -> list[tuple[str, DatasetSource]]:
    datasets: list[tuple[str, DatasetSource]] = []
    union = cfg.train.normalization == "union"
    if "cache" in selected:
        datasets.append(("cache.dataset", cfg.cache.dataset))
        datasets += [(f"eval.drift_sets[{i}].dataset", d.dataset) for i, d in enumerate(cfg.eval.drift_sets)]
    if "train" in selected or ("cache" in selected and union):
        datasets.append(("train.dataset", cfg.train.dataset))
    if "train" in selected:
        if union:
            datasets.append(("cache.dataset", cfg.cache.dataset))
        for name, run in cfg.runs.items():
            if run.replay is not None and run.replay.dataset is not None:
                datasets.append((f"runs.{name}.replay.dataset", run.replay.dataset))
    if "eval" in selected:
        datasets += [(f"eval.action_loss[{i}].dataset", a.dataset) for i, a in enumerate(cfg.eval.action_loss)]
    unique: dict[str, DatasetSource] = {}
    for field, source in datasets:
        unique.setdefault(field, source)
    return list(unique.items())


def _uses_assets(cfg: PipelineConfig, selected: set[str], teacher: PolicySource | None) -> bool:
    paths = [teacher.path] if teacher is not None else []
    paths += [source.root or "" for _, source in _datasets(cfg, selected)]
    return cfg.assets is not None and any(ASSETS_PLACEHOLDER in path for path in paths)


# ---------------------------------------------------------------------------- checks


def _artifacts_root(cfg: PipelineConfig) -> list[Problem]:
    root = Path(cfg.artifacts_root).expanduser()
    fix = "set artifacts_root to a folder you can write (it is created if missing)"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == root else f"lies under {existing}, which is a file"
        return [Problem("artifacts_root", cfg.artifacts_root, f"it {what}", fix)]
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is not writable" if existing == root else f"{existing} (where it would be created) is not writable"
        return [Problem("artifacts_root", cfg.artifacts_root, where, fix)]
    return []


def _devices(cfg: PipelineConfig, selected: set[str]) -> list[Problem]:
    import torch

    problems = []
    for section in SECTIONS:
        config = getattr(cfg, section, None)
        if section not in selected or config is None or not hasattr(config, "device"):
            continue
        field, requested = f"{section}.device", config.device
        if requested == "auto":
            continue
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError):
            problems.append(Problem(field, requested, "not a device name", "use 'auto', 'cpu' or 'cuda[:N]'"))
            continue
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                problems.append(Problem(field, requested, "CUDA is not available on this machine",
                                        "use 'cpu' or 'auto'"))
            elif device.index is not None and device.index >= count:
                problems.append(Problem(field, requested, f"this machine has {count} CUDA device(s)",
                                        f"use an index below {count}, or 'auto'"))
        elif device.type not in ("cpu", "mps"):
            problems.append(Problem(field, requested, f"craft runs on cpu or cuda, not {device.type}",
                                    "use 'auto', 'cpu' or 'cuda[:N]'"))
        elif device.type == "mps" and not torch.backends.mps.is_available():
            problems.append(Problem(field, requested, "MPS is not available on this machine", "use 'cpu' or 'auto'"))
    return problems


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def lerobot_home() -> Path:
    """Where lerobot keeps datasets (``$HF_LEROBOT_HOME``, default ``$HF_HOME/lerobot``)."""
    from huggingface_hub.constants import HF_HOME

    return Path(os.environ.get("HF_LEROBOT_HOME", Path(HF_HOME) / "lerobot")).expanduser()


def _dataset_cached(repo_id: str) -> bool:
    home = lerobot_home()
    if (home / repo_id / "meta" / "info.json").is_file():
        return True
    snapshots = home / "hub" / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    return any(snapshots.glob("*/meta/info.json"))


def _dataset(field: str, source: DatasetSource, *, assets_dir: str | None) -> list[Problem]:
    if source.root is not None:
        if ASSETS_PLACEHOLDER in source.root:
            if assets_dir is None:
                return []  # made by the assets stage
            root = Path(source.root.replace(ASSETS_PLACEHOLDER, assets_dir))
        else:
            root = Path(source.root).expanduser()
        if (root / "meta" / "info.json").is_file():
            return []
        fix = ("point it at a LeRobotDataset folder (the one holding meta/info.json), or remove root to use the "
               f"hub dataset {source.repo_id!r}")
        if not root.exists():
            return [Problem(f"{field}.root", source.root, f"{root} does not exist", fix)]
        return [Problem(f"{field}.root", source.root, f"{root} is not a LeRobotDataset (no meta/info.json)", fix)]
    if _dataset_cached(source.repo_id):
        return []
    if hub_offline():
        return [Problem(f"{field}.repo_id", source.repo_id,
                        f"not in the local dataset cache ({lerobot_home()}) and HF_HUB_OFFLINE is set",
                        f"download it once online, or set {field}.root to a local copy")]
    from huggingface_hub import HfApi

    try:
        with _quiet_hub():
            HfApi().dataset_info(source.repo_id, revision=source.revision, timeout=15)
    except Exception as exc:  # unreachable hub, unknown repo or revision, gated
        return [Problem(f"{field}.repo_id", source.repo_id, f"cannot be fetched from the hub ({_short(exc)})",
                        f"check the repo id and the network, or set HF_HUB_OFFLINE=1 with a cached copy or "
                        f"{field}.root to a local copy")]
    return []


@contextmanager
def _quiet_hub():
    """huggingface_hub logs each failed request as a warning; the problem line says it once."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _teacher_config(teacher: PolicySource, path: str) -> tuple[dict | None, Path | None, list[Problem]]:
    """(config.json, local folder or None, problems) of the teacher without loading it."""
    import json

    from craft_core.policy_io import _looks_local

    value = teacher.path
    folder_fix = ("point it at a folder written by save_pretrained (config.json + model.safetensors) or a hub "
                  "repo id such as 'lerobot/pi0fast-base'")
    if _looks_local(path):
        folder = Path(path).expanduser()
        if not folder.exists():
            return None, None, [Problem(TEACHER_FIELD, value, f"the folder {folder} does not exist", folder_fix)]
        if not (folder / "config.json").is_file():
            return None, None, [Problem(TEACHER_FIELD, value, f"{folder} holds no config.json (not a saved policy)",
                                        folder_fix)]
        return json.loads((folder / "config.json").read_text()), folder, []
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=teacher.revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), None, []
    if hub_offline():
        return None, None, [Problem(TEACHER_FIELD, value, "not in the local hub cache and HF_HUB_OFFLINE is set",
                                    "download it once online (huggingface-cli download), or use a local folder")]
    try:
        with _quiet_hub():
            config_file = hf_hub_download(path, "config.json", revision=teacher.revision, etag_timeout=15)
        return json.loads(Path(config_file).read_text()), None, []
    except Exception as exc:
        return None, None, [Problem(TEACHER_FIELD, value, f"cannot be fetched from the hub ({_short(exc)})",
                                    "check the repo id and the network, or set HF_HUB_OFFLINE=1 with a cached "
                                    "copy, or use a local folder")]


def _teacher(cfg: PipelineConfig, teacher: PolicySource, *, assets_dir: str | None) -> list[Problem]:
    path = teacher.path
    if ASSETS_PLACEHOLDER in path:
        if assets_dir is None:
            return []  # built by the assets stage
        path = path.replace(ASSETS_PLACEHOLDER, assets_dir)
    config, folder, problems = _teacher_config(teacher, path)
    if problems or config is None:
        return problems
    from craft_core.policies import ADAPTERS

    policy_type = config.get("type")
    if policy_type not in ADAPTERS:
        return [Problem(TEACHER_FIELD, teacher.path, f"its policy type {policy_type!r} has no craft adapter",
                        f"use a policy of type {sorted(ADAPTERS)}")]
    adapter = ADAPTERS[policy_type]
    unsupported = [t for t in cfg.cache.targets if t not in adapter.retention_targets]
    if unsupported:
        return [Problem("cache.targets", cfg.cache.targets,
                        f"a {policy_type} teacher cannot produce {unsupported}",
                        f"choose among {list(adapter.retention_targets)}")]
    if "prefix" not in cfg.cache.targets:
        return []
    depth = adapter.config_depth(config, _tiny_sizes(folder))
    if depth is None:
        return []
    from craft_core.policies.base import resolve_layers

    try:
        resolve_layers(cfg.cache.layers, depth)
    except ValueError as exc:
        return [Problem("cache.layers", cfg.cache.layers,
                        f"the teacher's backbone has depth {depth}: {exc}",
                        f"choose layers in {-(depth + 1)}..{depth}, e.g. [-2, -1]")]
    return []


def _tiny_sizes(folder: Path | None) -> dict | None:
    """Backbone sizes of a tiny offline folder (demo and tests), else None."""
    if folder is None:
        return None
    from craft_core.demo.tiny.loading import tiny_spec_of

    spec = tiny_spec_of(folder)
    return spec.get("sizes") if spec else None


def _upstream(cfg: PipelineConfig, plans: dict) -> list[Problem]:
    """One problem listing the consumed stages that are neither selected nor complete."""
    selected = [name for name, plan in plans.items() if plan.section in cfg.stages]
    consumers: dict[str, list[str]] = {}  # missing stage -> the selected stages consuming it
    for name in selected:
        for upstream in plans[name].upstream:
            if upstream not in selected and not plans[upstream].stage_dir().is_complete():
                consumers.setdefault(upstream, []).append(name)
    if not consumers:
        return []
    missing = list(consumers)
    users = list(dict.fromkeys(name for names in consumers.values() for name in names))
    sections = list(dict.fromkeys(plans[stage].section for stage in missing))
    return [Problem("stages", list(cfg.stages),
                    f"{', '.join(users)} consume{'s' if len(users) == 1 else ''} {', '.join(missing)}, not selected "
                    "and without a complete output for this config",
                    f"add {', '.join(sections)} to the stages (--stages)")]


# ---------------------------------------------------------------------------- input vs transient


def is_input_error(exc: BaseException) -> bool:
    """Whether a stage failure comes from its inputs or config (running it again gives the same
    failure: not worth a retry) rather than from something transient (a killed process, out of
    memory, a network or file-system hiccup). craft's refusals are ``ValueError``s (config,
    anchor store, normalisation, checkpoint) or its own setup errors; a stage run in its own
    process reports which kind it died of."""
    from craft_core.pipeline.fingerprint import IncompleteStageError
    from craft_core.pipeline.isolation import StageProcessError

    if isinstance(exc, StageProcessError):
        return exc.input_error
    if isinstance(exc, (ValueError, TypeError, LookupError, NotImplementedError, IncompleteStageError,
                        FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    # craft's own refusals that are RuntimeErrors (by name: importing their modules costs seconds)
    return type(exc).__name__ in {"PolicyLoadError", "RetentionSetupError", "ResumeConfigMismatch",
                                  "SimulatorUnavailableError", "NonFiniteLossError"}


def _scale_out(cfg: PipelineConfig) -> list:
    """A store root nobody can write, more training processes than devices (only when scaled out:
    the checks import the extraction and launch code)."""
    if cfg.cache.store_root is None and cfg.train.num_processes <= 1:
        return []
    from craft_core.pipeline.scale import check_scale_out

    try:
        check_scale_out(cfg)
    except ValueError as exc:
        return [Refusal(" ".join(str(exc).split()))]
    return []
