"""MetaWorld through lerobot's own env, rendered small and fast: env type ``metaworld_fast``.

lerobot 0.6.1's ``MetaworldEnv`` builds metaworld's env without a size, so every frame renders at
480x480 with 4096² shadow maps, reflections and 4x multisampling (its ``observation_width/height``
only shape the gym space), and its rollout cap is a hard-coded 500 steps (the env config's
``episode_length`` is not used). On a CPU (Mesa's software EGL) that is ~230 ms per frame. This
module changes only that, and nothing else of lerobot's env (task and camera setup, the corner2
flip, seeding with ``env.seed(s)`` before ``reset``, success -> terminated, expert policy, task
description):

- :func:`speed_up_rendering` sets, before the first render, the renderer's size to the image, and
  (``fast_render``) no shadow-map pass, no reflections, no multisampling and an offscreen buffer of
  the image's size;
- :class:`FastMetaworldEnv` is lerobot's ``MetaworldEnv`` with that hook, a real episode cap, and the
  raw 39-d observation kept (``last_raw_obs``) for metaworld's scripted experts;
- :class:`MetaworldFastEnvConfig` registers env type ``metaworld_fast`` in lerobot's ``EnvConfig``
  registry (a subclass of lerobot's ``metaworld`` config with a square ``image_size``), so
  ``make_env_config``, ``make_env``, ``make_env_pre_post_processors`` and ``eval_policy_all`` run it
  unchanged.

Importing this module imports mujoco: set ``MUJOCO_GL`` first
(``craft_core.evaluation.sim.ensure_headless_rendering``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig, _make_vec_env_cls
from lerobot.envs.configs import MetaworldEnv as MetaworldEnvConfig
from lerobot.envs.metaworld import DIFFICULTY_TO_TASKS, TASK_DESCRIPTIONS, MetaworldEnv

ENV_TYPE = "metaworld_fast"
FPS = 80  # lerobot's metaworld env config


def speed_up_rendering(mw_env, width: int, height: int, *, fast: bool = True) -> None:
    """Render metaworld's ``SawyerXYZEnv`` at ``width`` x ``height``; with ``fast`` also cheaply.

    Must run before the env's first render: mujoco copies ``model.vis`` into the GL context when
    gymnasium's offscreen viewer is created, on the first render.
    """
    renderer = mw_env.mujoco_renderer
    if renderer._viewers:  # rendered already: close the context so the settings below take effect
        renderer.close()
        renderer._viewers, renderer.viewer = {}, None
    model = mw_env.model
    if fast:
        model.vis.quality.shadowsize = 0  # no shadow-map pass (4096² by default)
        model.mat_reflectance[:] = 0  # no mirrored second pass of the (reflective) table
        model.vis.quality.offsamples = 0  # metaworld's scene asks for 4x multisampling
        model.vis.global_.offwidth = width  # gymnasium only ever grows the buffer (scene XML: 640x480)
        model.vis.global_.offheight = height
    mw_env.width, mw_env.height = width, height
    renderer.width, renderer.height = width, height


class FastMetaworldEnv(MetaworldEnv):
    """lerobot's MetaworldEnv rendering ``image_size`` squares, capped at ``episode_length`` steps."""

    def __init__(self, task: str, *, image_size: int = 64, episode_length: int = 120, fast_render: bool = True,
                 obs_type: str = "pixels_agent_pos", render_mode: str = "rgb_array", **kwargs):
        super().__init__(task, obs_type=obs_type, render_mode=render_mode, observation_width=image_size,
                         observation_height=image_size, **kwargs)
        self.fast_render = fast_render
        self.last_raw_obs: np.ndarray | None = None
        # lerobot's rollout caps an episode at the env's _max_episode_steps (read before any reset).
        self._max_episode_steps = episode_length

    def _ensure_env(self) -> None:
        if self._env is not None:
            return
        super()._ensure_env()  # lerobot: the MT1 task, camera position, first reset, seeded rand vec
        speed_up_rendering(self._env, self.observation_width, self.observation_height, fast=self.fast_render)

    def _format_raw_obs(self, raw_obs):
        # metaworld's scripted experts act on the raw observation. On a terminating step lerobot's
        # step() resets right after formatting, so after a success this is the next episode's first.
        self.last_raw_obs = np.asarray(raw_obs, dtype=np.float64).copy()
        return super()._format_raw_obs(raw_obs)


@EnvConfig.register_subclass(ENV_TYPE)
@dataclass
class MetaworldFastEnvConfig(MetaworldEnvConfig):
    """lerobot's ``metaworld`` env config with a square ``image_size``, a real episode cap and the
    fast-render switch. ``task``: a MetaWorld task name (``button-press-v3``), a comma list or a
    difficulty group (``easy``)."""

    task: str = "button-press-v3"
    image_size: int = 64
    episode_length: int = 120
    fast_render: bool = True

    def __post_init__(self):
        super().__post_init__()
        for key in ("top", "pixels/top"):
            if key in self.features:
                self.features[key] = PolicyFeature(type=FeatureType.VISUAL,
                                                   shape=(self.image_size, self.image_size, 3))

    def create_envs(self, n_envs: int, use_async_envs: bool = False) -> dict[str, dict[int, object]]:
        """``{task group: {task id: vector env}}`` as lerobot's ``create_metaworld_envs`` returns it."""
        vector_env = _make_vec_env_cls(use_async_envs, n_envs)
        envs: dict[str, dict[int, object]] = {}
        for group in (t.strip() for t in self.task.split(",") if t.strip()):
            for task_id, task in enumerate(DIFFICULTY_TO_TASKS.get(group, [group])):
                factories = [lambda task=task: FastMetaworldEnv(
                    task, image_size=self.image_size, episode_length=self.episode_length,
                    fast_render=self.fast_render, obs_type=self.obs_type, render_mode=self.render_mode,
                ) for _ in range(n_envs)]
                envs.setdefault(group, {})[task_id] = vector_env(factories)
        return envs


def task_description(task: str) -> str:
    """The instruction lerobot's env gives the policy for ``task`` (what demonstrations must carry)."""
    return TASK_DESCRIPTIONS[task]
