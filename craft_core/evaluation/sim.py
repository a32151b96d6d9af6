"""Closed-loop evaluation in simulation through lerobot's own eval machinery.

Everything that touches an environment is lerobot's: ``make_env_config`` builds the env config,
``make_env`` the vector envs, ``make_env_pre_post_processors`` the env-side processors and
``eval_policy_all`` runs the rollouts, so a number craft reports is the number ``lerobot-eval``
would report for the same checkpoint, env and seeds. MetaWorld runs as lerobot's own env rendered
small and fast (``craft_core.evaluation.metaworld``, env type ``metaworld_fast``).

Every model evaluated with the same entry sees the same episode seeds (``seed + i``), so episodes
are paired across models. Reported per entry: success rate with its Wilson 95 % interval, and,
for policies that decode action tokens (pi0_fast), the fraction of decodings that failed (lerobot
then substitutes an all-zero action chunk: a model that mostly fails to decode is not evaluated).
"""

import importlib.util
import math
import os
from pathlib import Path

import torch

from craft_core.config import SimEvalConfig
from craft_core.noise import lerobot_eval_bars

# Which pip extra of lerobot brings the simulator of each env craft can evaluate in.
ENV_PACKAGES: dict[str, tuple[str, str]] = {
    "pusht": ("gym_pusht", "lerobot[pusht]"),
    "aloha": ("gym_aloha", "lerobot[aloha]"),
    "libero": ("libero", "lerobot[libero]"),
    "metaworld": ("metaworld", "lerobot[metaworld]"),
}
MUJOCO_ENVS = ("aloha", "libero", "metaworld")


class SimulatorUnavailableError(RuntimeError):
    """The simulator package of a requested env is not installed."""


def check_simulator_installed(env: str) -> None:
    package, extra = ENV_PACKAGES[env]
    if importlib.util.find_spec(package) is None:
        from importlib.metadata import version

        raise SimulatorUnavailableError(
            f"eval.sim env {env!r} needs the simulator package '{package}', which is not installed. "
            f"Install it with: pip install '{extra}=={version('lerobot')}', "
            f"or remove the {env!r} entry from eval.sim."
        )


def ensure_headless_rendering(env: str) -> None:
    """MuJoCo (aloha, libero) needs an offscreen GL backend when there is no display.

    EGL works both with Mesa's software renderer on a CPU machine and with the NVIDIA driver on a
    headless GPU node. It must be chosen before dm_control/mujoco is first imported, which is why
    this runs before ``make_env``; an explicit MUJOCO_GL from the user always wins.
    """
    if env not in MUJOCO_ENVS:
        return
    # Mesa's software renderer (llvmpipe) draws in the calling thread with LP_NUM_THREADS=0: the
    # fastest choice on a few CPU cores, where its own threads only compete with the simulation.
    os.environ.setdefault("LP_NUM_THREADS", "0")
    if "MUJOCO_GL" in os.environ or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    os.environ["MUJOCO_GL"] = "egl"
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def make_env_cfg(sim: SimEvalConfig, policy_cfg=None):
    """lerobot's env config for one ``eval.sim`` entry (task and episode length applied).

    MetaWorld's image size defaults to the policy's image feature (``policy_cfg``), so the env
    renders what the policy was trained on.
    """
    from lerobot.envs.factory import make_env_config

    overrides: dict = {}
    if sim.task is not None:
        overrides["task"] = sim.task
    if sim.max_episode_steps is not None:
        # Every env config craft supports has `episode_length`, which lerobot passes on to gym as
        # max_episode_steps (libero uses it to cut its own per-suite horizon).
        overrides["episode_length"] = sim.max_episode_steps
    env_type = sim.env
    if sim.env == "metaworld":
        ensure_headless_rendering("metaworld")
        from craft_core.evaluation import metaworld  # registers env type metaworld_fast

        env_type = metaworld.ENV_TYPE
        overrides["image_size"] = sim.image_size or _policy_image_size(policy_cfg) or 64
        overrides["fast_render"] = sim.fast_render
    return make_env_config(env_type, **overrides)


def _policy_image_size(policy_cfg) -> int | None:
    if policy_cfg is None:
        return None
    for feature in policy_cfg.image_features.values():
        return int(feature.shape[-1])  # (C, H, W): square MetaWorld renders
    return None


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95 % interval of a success rate (well-behaved at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def sim_key(sim: SimEvalConfig, env_cfg=None) -> str:
    """Name of one sim entry in the report: its ``name``, else ``pusht`` or ``aloha/AlohaTransferCube-v0``."""
    if sim.name:
        return sim.name
    return sim.env if sim.task is None else f"{sim.env}/{sim.task}"


def check_policy_fits_env(policy_cfg, env_cfg, env_preprocessor, checkpoint: str) -> None:
    """Fail before any rollout when the policy reads inputs the env never produces.

    Only possible statically when the env's own processors are the identity (pusht, aloha): then
    what the policy sees is exactly ``env_to_policy_features``. Envs with processors (libero)
    rename/concatenate observations and are left to lerobot.
    """
    from lerobot.configs import FeatureType
    from lerobot.envs.utils import env_to_policy_features

    if len(env_preprocessor.steps) > 0:
        return
    provided = env_to_policy_features(env_cfg)
    expected = {
        key: feature
        for key, feature in policy_cfg.input_features.items()
        if feature.type in (FeatureType.VISUAL, FeatureType.STATE, FeatureType.ENV)
    }
    missing = sorted(set(expected) - set(provided))
    if missing:
        raise ValueError(
            f"the policy at {checkpoint} reads {missing}, which env {env_cfg.type!r} "
            f"(task {env_cfg.task}) does not produce; it produces {sorted(provided)}. Evaluate this "
            f"policy in the env it was trained for, or train it on a dataset recorded in this env."
        )
    action = policy_cfg.output_features.get("action")
    env_action = provided.get("action")
    if action is not None and env_action is not None and tuple(action.shape) != tuple(env_action.shape):
        raise ValueError(
            f"the policy at {checkpoint} outputs actions of shape {tuple(action.shape)} but env "
            f"{env_cfg.type!r} takes {tuple(env_action.shape)}"
        )


def simulate(
    policy,
    preprocessor,
    postprocessor,
    sim: SimEvalConfig,
    *,
    checkpoint: str,
    videos_dir: Path | None,
) -> dict:
    """Roll ``policy`` out ``sim.n_episodes`` times with lerobot's ``eval_policy_all``.

    Returns aggregates, one row per episode (seed, sum/max reward, success) and the video paths.
    """
    from lerobot.envs import close_envs
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy_all
    from lerobot.utils.random_utils import set_seed

    from craft_core.policies import get_adapter

    check_simulator_installed(sim.env)
    ensure_headless_rendering(sim.env)
    env_cfg = make_env_cfg(sim, policy.config)
    env_preprocessor, env_postprocessor = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    check_policy_fits_env(policy.config, env_cfg, env_preprocessor, checkpoint)
    decoding = get_adapter(policy).action_decoding_monitor()

    envs = make_env(env_cfg, n_envs=sim.batch_size, use_async_envs=False)
    # The same seed before every run: runs differ by their weights, not by their sampling noise.
    set_seed(sim.seed)
    n_videos = sim.n_videos if videos_dir is not None else 0
    videos_dir = videos_dir if n_videos > 0 else None  # lerobot creates the folder whenever one is given
    try:
        with torch.no_grad(), decoding, lerobot_eval_bars():  # nested rollout bars only when bars are on
            info = eval_policy_all(
                envs=envs,
                policy=policy,
                env_preprocessor=env_preprocessor,
                env_postprocessor=env_postprocessor,
                preprocessor=preprocessor,
                postprocessor=postprocessor,
                n_episodes=sim.n_episodes,
                max_episodes_rendered=n_videos,
                videos_dir=videos_dir,
                start_seed=sim.seed,
                max_parallel_tasks=env_cfg.max_parallel_tasks,
            )
    except Exception as exc:
        # dm_control (aloha) gives up on actions far outside the joints' range; say what it means.
        if type(exc).__name__ != "PhysicsError":
            raise
        raise RuntimeError(
            f"the simulation of {env_cfg.type!r} became unstable under the policy at {checkpoint} ({exc}). Its "
            f"actions are probably far outside the robot's range: check that the checkpoint's postprocessor "
            f"unnormalises actions with the statistics of a dataset recorded in this env."
        ) from exc
    finally:
        close_envs(envs)

    episodes = []
    for task in sorted(info["per_task"], key=lambda t: (t["task_group"], t["task_id"])):
        metrics = task["metrics"]
        for index, (sum_reward, max_reward, success) in enumerate(
            zip(metrics["sum_rewards"], metrics["max_rewards"], metrics["successes"], strict=True)
        ):
            episodes.append(
                {
                    "task_group": task["task_group"],
                    "task_id": int(task["task_id"]),
                    "episode": index,
                    # eval_policy seeds episode i of a task with start_seed + i.
                    "seed": sim.seed + index,
                    "sum_reward": float(sum_reward),
                    "max_reward": float(max_reward),
                    "success": bool(success),
                }
            )
    overall = info["overall"]
    successes = sum(e["success"] for e in episodes)
    low, high = wilson_interval(successes, len(episodes))
    return {
        "env": sim.env,
        "task": env_cfg.task,
        "episode_length": getattr(env_cfg, "episode_length", None),
        "image_size": getattr(env_cfg, "image_size", None),
        "n_episodes": len(episodes),
        "batch_size": sim.batch_size,
        "seed": sim.seed,
        "successes": successes,
        "success_rate": successes / len(episodes),
        "success_ci95": [low, high],
        "action_decodings": decoding.decoded,
        "action_decode_failures": decoding.failed,
        "action_decode_failure_rate": decoding.failure_rate,
        "avg_sum_reward": float(overall["avg_sum_reward"]),
        "avg_max_reward": float(overall["avg_max_reward"]),
        "eval_s": float(overall["eval_s"]),
        "s_per_episode": float(overall["eval_ep_s"]),
        "episodes": episodes,
        "videos": [str(p) for p in overall.get("video_paths", [])],
    }
