"""Small real LeRobotDatasets recorded offline by seeded scripted controllers: gym-pusht, gym-aloha, MetaWorld.

Feature names are the ones lerobot's env preprocessing (`lerobot.envs.utils.preprocess_observation`)
produces for these envs, so a policy trained on a recording is evaluated in lerobot's sim eval
(`make_env` + `eval_policy_all`) without renaming:

- pusht: `observation.image` [S, S, 3] uint8, `observation.state` [2] (agent x, y),
  `action` [2] (target x, y in the 512x512 workspace), plus `next.reward` / `next.success`.
- aloha: `observation.images.top` [S, round(S*4/3), 3] (the sim's 4:3 top camera, rendered at
  that size),
  `observation.state` [14] (joint positions), `action` [14] (joint targets).
- metaworld: `observation.image` [S, S, 3] (the corner2 camera as lerobot's env renders and flips
  it, at S px through `craft_core.evaluation.metaworld`), `observation.state` [4] (hand xyz and
  gripper opening), `action` [4] (metaworld's scripted expert, clipped to [-1, 1]); the task string
  is lerobot's own description of the task (what its eval gives the policy).

Camera frames are stored as images (PNG inside the parquet files) by default: at these sizes it
recorded and read back faster than AV1 video here (3x20 pusht frames: ~0.8 s vs ~1.3 s to record,
~0.2 s vs ~0.3 s to read), and decodes without any video backend. `use_videos=True` stores them as
videos instead; those decode with `video_backend="pyav"` (torchcodec cannot load on these machines).

Tasks. pusht (privileged scripted controllers reading the sim's block pose; the pusher target moves
at most 30 px per step, plus N(0, 3 px) noise):
- `push_t`: orbits to behind the block, then pushes its centre towards the goal's centre.
  Translation only (it ignores the angle), so it moves the block but does not solve the task:
  over 20 seeded starts the block-goal distance falls from 129 px to 51 / 22 / 12 px after
  60 / 150 / 300 steps, coverage rises from 0.04 to 0.25 / 0.41 / 0.41, 0 successes.
- `circle`: circles the block's starting position at 120 px radius, one turn per 24 steps.
- `corner`: goes straight to the top-left corner and stays there.
aloha (`AlohaInsertion-v0` physics, joint-position targets, N(0, 0.01 rad) noise): `reach` leans both
arms forward over the table and closes the grippers; `lift` raises and twists the arms outwards
while opening and closing the grippers. Neither inserts anything. metaworld: any task of lerobot's
list, driven by metaworld's own scripted expert policy for it (they solve 12 of 13 easy tasks
10/10 here); an episode stops at its first success, as lerobot's eval does, and a failed expert
episode is redrawn with another seed.

Every episode is reproducible: the env is reset with a seed derived from (`seed`, episode index)
and the controller's action noise comes from a generator seeded the same way, so the same
arguments give the same actions and states (and, for pusht, the same images; gym-aloha notes its
renders can differ slightly between runs).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Task name -> instruction text stored with every frame.
PUSHT_TASKS: dict[str, str] = {
    "push_t": "push the T-shaped block onto the green target",
    "circle": "move the pusher in a circle around the block",
    "corner": "move the pusher to the top-left corner",
}
ALOHA_TASKS: dict[str, str] = {
    "reach": "reach both arms forward over the table and close the grippers",
    "lift": "raise both arms and open and close the grippers",
}

ENVS = ("pusht", "aloha", "metaworld")
PUSHT_FPS = 10  # lerobot's PushtEnv fps
ALOHA_FPS = 50  # lerobot's AlohaEnv fps (gym_aloha DT = 0.02 s)
METAWORLD_FPS = 80  # lerobot's metaworld env config
# A failed scripted-expert episode is redrawn with another seed, at most this many times.
METAWORLD_EXPERT_RETRIES = 5
METAWORLD_RETRY_SEED_STRIDE = 50_000

PUSHT_WORKSPACE = 512.0
PUSHT_MAX_STEP_PX = 30.0  # pusher target moves at most this far per step: smooth, pushable motion
PUSHT_NOISE_PX = 3.0
PUSHT_ORBIT_RADIUS = 115.0  # clears the T (its far corners are ~100 px from its centre of gravity)
PUSHT_ORBIT_STEP_RAD = 0.6
PUSHT_ORBIT_ALIGN_RAD = 0.35  # close enough to straight behind the block to start pushing
ALOHA_NOISE_RAD = 0.01


def _tasks(env: str) -> dict[str, str] | tuple[str, ...]:
    if env == "metaworld":
        from craft_core.config import metaworld_tasks

        return metaworld_tasks()
    return PUSHT_TASKS if env == "pusht" else ALOHA_TASKS


def _episode_seed(seed: int, episode_index: int) -> int:
    return seed * 100_003 + episode_index


# ---------------------------------------------------------------------------------------------
# gym-pusht


def _pusht_features(image_size: int, camera_dtype: str) -> dict:
    return {
        "observation.image": {
            "dtype": camera_dtype,
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (2,), "names": {"motors": ["x", "y"]}},
        "action": {"dtype": "float32", "shape": (2,), "names": {"motors": ["x", "y"]}},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }


def _block_centre(env) -> np.ndarray:
    block = env.block
    return np.array(block.local_to_world(block.center_of_gravity), dtype=np.float64)


def _goal_centre(env) -> np.ndarray:
    # Where the block's centre of gravity is when the block sits exactly on the goal pose.
    x, y, theta = env.goal_pose
    cx, cy = env.block.center_of_gravity
    c, s = math.cos(theta), math.sin(theta)
    return np.array([x + c * cx - s * cy, y + s * cx + c * cy])


def _push_t_waypoint(env, step: int) -> np.ndarray:
    """Push the block's centre towards the goal's centre: orbit to behind the block, then push through.

    Orbiting at a radius that clears the T keeps the pusher from shoving the block the wrong way
    on its way round. Translation only (the block's angle is not controlled), so this brings the
    block close to the goal but rarely reaches the 95 % coverage that counts as success.
    """
    agent = np.array(env.agent.position, dtype=np.float64)
    block, goal = _block_centre(env), _goal_centre(env)
    to_goal = goal - block
    dist = np.linalg.norm(to_goal)
    if dist < 5.0:
        return agent
    push_dir = to_goal / dist
    behind_angle = math.atan2(-push_dir[1], -push_dir[0])
    rel = agent - block
    agent_angle = math.atan2(rel[1], rel[0])
    error = (behind_angle - agent_angle + math.pi) % (2 * math.pi) - math.pi
    if abs(error) > PUSHT_ORBIT_ALIGN_RAD:
        angle = agent_angle + float(np.clip(error, -PUSHT_ORBIT_STEP_RAD, PUSHT_ORBIT_STEP_RAD))
        return block + PUSHT_ORBIT_RADIUS * np.array([math.cos(angle), math.sin(angle)])
    return block + 30.0 * push_dir


def _circle_waypoint_factory(env) -> Callable[[object, int], np.ndarray]:
    centre = _block_centre(env)
    rel = np.array(env.agent.position) - centre
    start_angle = math.atan2(rel[1], rel[0])
    radius = 120.0
    angular_step = 2 * math.pi / 24  # one turn every 24 steps (2.4 s at 10 fps)

    def waypoint(env, step: int) -> np.ndarray:
        angle = start_angle + angular_step * (step + 1)
        return centre + radius * np.array([math.cos(angle), math.sin(angle)])

    return waypoint


def _corner_waypoint(env, step: int) -> np.ndarray:
    return np.array([40.0, 40.0])  # image top-left (pusht renders x right, y down)


def _pusht_controller(task: str, env) -> Callable[[object, int], np.ndarray]:
    if task == "push_t":
        return _push_t_waypoint
    if task == "circle":
        return _circle_waypoint_factory(env)
    if task == "corner":
        return _corner_waypoint
    raise ValueError(f"unknown pusht task {task!r}; choose one of {sorted(PUSHT_TASKS)}")


def _pusht_action(sim, waypoint, step: int, rng: np.random.Generator | None) -> np.ndarray:
    """Next pusher target: a bounded step towards the controller's waypoint, plus seeded noise."""
    agent = np.array(sim.agent.position, dtype=np.float64)
    delta = waypoint(sim, step) - agent
    norm = np.linalg.norm(delta)
    if norm > PUSHT_MAX_STEP_PX:
        delta *= PUSHT_MAX_STEP_PX / norm
    if rng is not None:
        delta += rng.normal(0.0, PUSHT_NOISE_PX, 2)
    return np.clip(agent + delta, 10.0, PUSHT_WORKSPACE - 10.0).astype(np.float32)


def _record_scripted_episodes(
    dataset, env, *, controller, camera, instruction: str, n_episodes: int, max_steps: int, seed: int,
    first_episode: int = 0,
) -> None:
    """Roll out a scripted controller for ``n_episodes`` episodes and record every step; closes ``env``.

    ``controller(env, first_obs, noise)`` returns ``act(step) -> float32 action`` for one episode;
    ``noise`` is that episode's seeded generator, so an episode's actions depend only on its seed.
    ``camera`` is (dataset feature key, obs -> image). Episode ``i`` of the recording is seeded as
    episode ``first_episode + i`` of ``seed``, so a recording split in two (training and held-out
    episodes) holds the same episodes as one recording of all of them.
    """
    camera_key, camera_image = camera
    try:
        for episode in range(first_episode, first_episode + n_episodes):
            episode_seed = _episode_seed(seed, episode)
            noise = np.random.default_rng(episode_seed)
            obs, _ = env.reset(seed=episode_seed)
            act = controller(env, obs, noise)
            for step in range(max_steps):
                action = act(step)
                next_obs, reward, terminated, truncated, info = env.step(action)
                dataset.add_frame(
                    {
                        camera_key: camera_image(obs),
                        "observation.state": np.asarray(obs["agent_pos"], dtype=np.float32),
                        "action": action,
                        "next.reward": np.array([reward], dtype=np.float32),
                        "next.success": np.array([bool(info["is_success"])]),
                        "task": instruction,
                    }
                )
                obs = next_obs
                if terminated or truncated:
                    break
            dataset.save_episode()
    finally:
        env.close()


def _record_pusht(dataset, task: str, *, n_episodes: int, max_steps: int, image_size: int, seed: int,
                  first_episode: int = 0):
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
    import gymnasium as gym

    env = gym.make(
        "gym_pusht/PushT-v0",
        obs_type="pixels_agent_pos",
        render_mode="rgb_array",
        observation_width=image_size,
        observation_height=image_size,
        max_episode_steps=max_steps,
    )

    def pusht_controller(env, obs, noise):
        sim = env.unwrapped
        waypoint = _pusht_controller(task, sim)
        return lambda step: _pusht_action(sim, waypoint, step, rng=noise)

    _record_scripted_episodes(
        dataset,
        env,
        controller=pusht_controller,
        camera=("observation.image", lambda obs: obs["pixels"]),
        instruction=PUSHT_TASKS[task],
        n_episodes=n_episodes,
        max_steps=max_steps,
        seed=seed,
        first_episode=first_episode,
    )


# ---------------------------------------------------------------------------------------------
# gym-aloha


def _aloha_image_shape(image_size: int) -> tuple[int, int, int]:
    # The sim's top camera is 480x640 (4:3); keep the aspect so eval frames resize alike.
    return (image_size, round(image_size * 4 / 3), 3)


def _aloha_features(image_size: int, camera_dtype: str) -> dict:
    from gym_aloha.constants import ACTIONS, JOINTS

    return {
        "observation.images.top": {
            "dtype": camera_dtype,
            "shape": _aloha_image_shape(image_size),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (14,), "names": {"motors": list(JOINTS)}},
        "action": {"dtype": "float32", "shape": (14,), "names": {"motors": list(ACTIONS)}},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }


# Joint offsets from the start pose, per arm: waist, shoulder, elbow, forearm roll, wrist angle,
# wrist rotate (the left arm's; the right arm mirrors waist / roll / rotate as the arms face each other).
_ALOHA_REACH_OFFSET = np.array([0.0, 0.45, -0.35, 0.0, 0.35, 0.0])
_ALOHA_LIFT_OFFSET = np.array([0.3, -0.4, -0.3, 0.0, -0.4, 0.5])


def _aloha_action(task: str, start: np.ndarray, step: int, max_steps: int) -> np.ndarray:
    """Joint targets: a smooth move from the start pose plus a gripper pattern (1 open, 0 closed).

    reach: lean forward over the table (first 60 % of the episode), then close the grippers.
    lift: raise and twist the arms outwards while the grippers open and close every 8 steps.
    """
    progress = min(1.0, (step + 1) / max(1.0, 0.6 * max_steps))
    offset = _ALOHA_REACH_OFFSET if task == "reach" else _ALOHA_LIFT_OFFSET
    gripper = (1.0 if progress < 1.0 else 0.0) if task == "reach" else float((step // 8) % 2 == 0)
    action = np.empty(14)
    for arm, side in ((0, 1.0), (7, -1.0)):
        mirrored = offset * np.array([side, 1, 1, side, 1, side])
        action[arm : arm + 6] = start[arm : arm + 6] + progress * mirrored
        action[arm + 6] = gripper
    return action


def _make_aloha_env(height: int, width: int):
    """gym-aloha's insertion env, rendering only the top camera, directly at the recording size.

    The stock task renders three 480x640 cameras every step (~0.5-1 s/step with software EGL);
    the dataset keeps only `top`, so rendering just that camera is ~5x cheaper. Everything else
    (model, physics, control, reset and seeding) is gym-aloha's own.
    """
    from dm_control import mujoco
    from dm_control.rl import control
    from gym_aloha.constants import ASSETS_DIR, DT
    from gym_aloha.env import AlohaEnv
    from gym_aloha.tasks.sim import InsertionTask

    class TopCameraInsertionTask(InsertionTask):
        def get_observation(self, physics):
            return {
                "qpos": self.get_qpos(physics),
                "qvel": self.get_qvel(physics),
                "env_state": self.get_env_state(physics),
                "images": {"top": physics.render(height=height, width=width, camera_id="top")},
            }

    class TopCameraAlohaEnv(AlohaEnv):
        def _make_env_task(self, task_name):
            physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / "bimanual_viperx_insertion.xml"))
            return control.Environment(
                physics,
                TopCameraInsertionTask(),
                time_limit=float("inf"),
                control_timestep=DT,
                n_sub_steps=None,
                flat_observation=False,
            )

    return TopCameraAlohaEnv(
        "insertion",
        obs_type="pixels_agent_pos",
        render_mode="rgb_array",
        observation_height=height,
        observation_width=width,
    )


def _record_aloha(dataset, task: str, *, n_episodes: int, max_steps: int, image_size: int, seed: int,
                  first_episode: int = 0):
    if task not in ALOHA_TASKS:
        raise ValueError(f"unknown aloha task {task!r}; choose one of {sorted(ALOHA_TASKS)}")
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the mujoco import
    height, width, _ = _aloha_image_shape(image_size)
    env = _make_aloha_env(height, width)

    def aloha_controller(env, obs, noise):
        start = np.asarray(obs["agent_pos"], dtype=np.float64).copy()

        def act(step: int) -> np.ndarray:
            action = _aloha_action(task, start, step, max_steps)
            joints = np.r_[0:6, 7:13]
            action[joints] += noise.normal(0.0, ALOHA_NOISE_RAD, joints.size)
            return action.astype(np.float32)

        return act

    _record_scripted_episodes(
        dataset,
        env,
        controller=aloha_controller,
        camera=("observation.images.top", lambda obs: obs["pixels"]["top"]),
        instruction=ALOHA_TASKS[task],
        n_episodes=n_episodes,
        max_steps=max_steps,
        seed=seed,
        first_episode=first_episode,
    )


# ---------------------------------------------------------------------------------------------
# MetaWorld (lerobot's env, rendered small: craft_core.evaluation.metaworld)


def _metaworld_features(image_size: int, camera_dtype: str) -> dict:
    # The names lerobot's env preprocessing gives MetaWorld's observations (features_map of its
    # metaworld config: pixels/top -> observation.image, agent_pos -> observation.state).
    return {
        "observation.image": {"dtype": camera_dtype, "shape": (image_size, image_size, 3),
                              "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": {"motors": ["x", "y", "z", "gripper"]}},
        "action": {"dtype": "float32", "shape": (4,), "names": {"motors": ["dx", "dy", "dz", "grip"]}},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }


def _metaworld_expert_episode(env, seed: int, max_steps: int) -> tuple[list[dict], bool]:
    """metaworld's scripted expert for the env's task, once, from ``reset(seed)``: (frames, success).

    Stops at the first success, as lerobot's eval does (its env terminates there).
    """
    obs, _ = env.reset(seed=seed)  # lerobot's env calls env.seed(seed) first: the episode is paired
    frames = []
    for _ in range(max_steps):
        action = np.clip(env.expert_policy.get_action(env.last_raw_obs), -1.0, 1.0).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        frames.append({
            "observation.image": obs["pixels"],
            "observation.state": np.asarray(obs["agent_pos"], dtype=np.float32),
            "action": action,
            "next.reward": np.array([reward], dtype=np.float32),
            "next.success": np.array([bool(info["is_success"])]),
        })
        obs = next_obs
        if info["is_success"] or terminated or truncated:
            return frames, bool(info["is_success"])
    return frames, False


def _record_metaworld(dataset, task: str, *, n_episodes: int, max_steps: int, image_size: int, seed: int,
                      first_episode: int = 0) -> None:
    """Successful scripted-expert episodes of ``task``: a failed one is redrawn with another seed."""
    from craft_core.evaluation.metaworld import FastMetaworldEnv, task_description
    from craft_core.evaluation.sim import ensure_headless_rendering

    ensure_headless_rendering("metaworld")
    env = FastMetaworldEnv(task, image_size=image_size, episode_length=max_steps)
    instruction = task_description(task)
    try:
        for episode in range(first_episode, first_episode + n_episodes):
            for retry in range(METAWORLD_EXPERT_RETRIES + 1):
                frames, success = _metaworld_expert_episode(
                    env, _episode_seed(seed, episode) + METAWORLD_RETRY_SEED_STRIDE * retry, max_steps)
                if success:
                    break
            else:
                raise RuntimeError(
                    f"metaworld's scripted expert failed {METAWORLD_EXPERT_RETRIES + 1} times in a row on {task} "
                    f"(episode {episode}, at most {max_steps} steps); raise assets.max_episode_steps or pick another task"
                )
            for frame in frames:
                dataset.add_frame({**frame, "task": instruction})
            dataset.save_episode()
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------


def record_dataset(
    env: str,
    task: str,
    *,
    repo_id: str,
    root: Path | str,
    n_episodes: int,
    max_steps: int,
    image_size: int = 96,
    seed: int = 0,
    fps: int | None = None,
    overwrite: bool = False,
    use_videos: bool = False,
    first_episode: int = 0,
):
    """Record `n_episodes` scripted episodes of `task` in `env` into a LeRobotDataset at `root`.

    Returns the reloaded `LeRobotDatasetMetadata` (stats included). `image_size` is the camera
    height in pixels (pusht square; aloha keeps the sim's 4:3). `fps` defaults to the env's own
    control rate in lerobot (pusht 10, aloha 50); it only sets the timestamps. `root` must not
    exist unless `overwrite=True`. `use_videos` stores camera frames as videos instead of images.
    `first_episode` offsets the episode seeds (see `_record_scripted_episodes`).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    if env not in ENVS:
        raise ValueError(f"env={env!r} is not supported; choose one of {ENVS}")
    tasks = _tasks(env)
    if task not in tasks:
        raise ValueError(f"task={task!r} is not a {env} task; choose one of {sorted(tasks)}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes={n_episodes} must be >= 1")
    if max_steps < 2:
        raise ValueError(f"max_steps={max_steps} must be >= 2 (delta timestamps need two frames)")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} must be >= 16 pixels")
    root = Path(root)
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"dataset root {root} already exists; pass overwrite=True or pick a new root")
        shutil.rmtree(root)

    camera_dtype = "video" if use_videos else "image"
    features = {"pusht": _pusht_features, "aloha": _aloha_features, "metaworld": _metaworld_features}[env](
        image_size, camera_dtype)
    default_fps = {"pusht": PUSHT_FPS, "aloha": ALOHA_FPS, "metaworld": METAWORLD_FPS}[env]
    dataset = LeRobotDataset.create(
        repo_id,
        fps or default_fps,
        features,
        root=root,
        robot_type="sawyer" if env == "metaworld" else env,
        use_videos=use_videos,
    )
    record = {"pusht": _record_pusht, "aloha": _record_aloha, "metaworld": _record_metaworld}[env]
    record(dataset, task, n_episodes=n_episodes, max_steps=max_steps, image_size=image_size, seed=seed,
           first_episode=first_episode)
    dataset.finalize()
    return LeRobotDatasetMetadata(repo_id, root=root)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m craft_core.demo.sim_datasets",
        description="Record a scripted gym-pusht / gym-aloha LeRobotDataset offline.",
    )
    parser.add_argument("env", choices=ENVS)
    parser.add_argument("task", help=f"pusht: {sorted(PUSHT_TASKS)}; aloha: {sorted(ALOHA_TASKS)}")
    parser.add_argument("--root", required=True, type=Path, help="dataset folder to create")
    parser.add_argument("--repo-id", default=None, help="default: local/<env>_<task>")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="steps per episode")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=None)
    parser.add_argument("--videos", action="store_true", help="store camera frames as AV1 videos")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    meta = record_dataset(
        args.env,
        args.task,
        repo_id=args.repo_id or f"local/{args.env}_{args.task}",
        root=args.root,
        n_episodes=args.episodes,
        max_steps=args.steps,
        image_size=args.image_size,
        seed=args.seed,
        fps=args.fps,
        overwrite=args.overwrite,
        use_videos=args.videos,
    )
    summary = {
        "repo_id": meta.repo_id,
        "root": str(meta.root),
        "episodes": meta.total_episodes,
        "frames": meta.total_frames,
        "fps": meta.fps,
        "features": {k: list(v["shape"]) for k, v in meta.features.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
