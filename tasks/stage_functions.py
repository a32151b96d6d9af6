"""The craft_core call of each stage, shaped for a content-addressed directory. No Prefect here.

These run either in the task's process or in a spawned child (``tasks.isolation``), so they only
take picklable arguments (config models, strings) and return small JSON-able dicts that go into
the stage's manifest: locations and headline numbers, never arrays or whole reports.
"""

from pathlib import Path

from craft_core.config import AssetsConfig, CacheConfig, EvalConfig, PolicySource, TrainConfig

STORE_NAME = "anchors.zarr"


def store_url(cache_dir: str) -> str:
    return str(Path(cache_dir) / STORE_NAME)


def build_assets(cfg: AssetsConfig, out_dir: str, progress=None) -> dict:
    from craft_core.assets import build_demo_assets

    return build_demo_assets(cfg, Path(out_dir), progress=progress)


def extract(cfg: CacheConfig, out_dir: str, progress=None) -> dict:
    from craft_core.extraction import extract_anchors

    url = store_url(out_dir)
    info = extract_anchors(cfg, url, progress=progress)
    return {**dict(info), "store_url": url}


def train_run(cfg: TrainConfig, teacher: PolicySource, store: str | None, out_dir: str, retention: bool,
              progress=None) -> dict:
    from craft_core.train import train

    return dict(train(cfg, teacher=teacher, store_url=store, out_dir=Path(out_dir), retention=retention,
                      progress=progress))


def evaluate_runs(cfg: EvalConfig, runs: dict[str, str], teacher: PolicySource, store: str | None, out_dir: str,
                  train_results: dict[str, dict], fingerprints: dict[str, str], progress=None) -> dict:
    from craft_core.evaluation import comparison_rows, evaluate

    report = evaluate(cfg, runs=runs, teacher=teacher, store_url=store, out_dir=Path(out_dir),
                      train_results=train_results, fingerprints=fingerprints, progress=progress)
    return {
        "report_json": str(Path(out_dir) / "report.json"),
        "report_md": str(Path(out_dir) / "report.md"),
        "comparison": comparison_rows(report),
        "runs": sorted(report["runs"]),
    }
