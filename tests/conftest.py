"""Test-wide environment: no hub, no GPU, headless rendering, private Prefect home."""

import os

# Set before lerobot / huggingface_hub / prefect are imported anywhere in the test session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Shared session fixtures live in tests/fixtures/ (one module per owner) and are imported here so
# every test module sees them.
from tests.fixtures.data import *  # noqa: E402,F401,F403
from tests.fixtures.policies import *  # noqa: E402,F401,F403
from tests.fixtures.policies_pi0 import *  # noqa: E402,F401,F403
