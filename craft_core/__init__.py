"""craft: Constrained Retention Fine-Tuning (CRaFT) with hidden-state anchoring for lerobot VLAs.

This package is the library. It never imports Prefect; `tasks/` and `flows/` wrap it.
"""

__version__ = "0.1.0"


def _shorten_torchcodec_warning() -> None:
    """Turn lerobot's page-long "torchcodec cannot be loaded" traceback into one line.

    lerobot probes torchcodec whenever it picks a default video backend; where FFmpeg's shared
    libraries are absent (as on these machines) it logs a full traceback, once per process, before
    falling back to pyav. craft always asks for pyav explicitly, so the traceback is noise.
    """
    import logging

    class _OneLine(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "torchcodec" in str(record.msg) and "pyav" in str(record.msg):
                record.msg = "torchcodec cannot be loaded here; lerobot falls back to pyav (craft uses pyav anyway)"
                record.args = ()
            return True

    logging.getLogger("lerobot.utils.import_utils").addFilter(_OneLine())


_shorten_torchcodec_warning()

from craft_core import noise as _noise  # noqa: E402  (after the torchcodec filter: it sees the short text)

_noise.install()
