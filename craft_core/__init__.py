"""craft: Constrained Retention Fine-Tuning (CRaFT) with hidden-state anchoring for lerobot VLAs.

This package is the library. It never imports Prefect; `tasks/` and `flows/` wrap it.
"""

__version__ = "0.1.0"
