"""Known, harmless output of lerobot and its dependencies, filtered where it is produced.

A pipeline run loads policies a dozen times and rolls them out; lerobot prints a legal banner and
progress chatter on every load, logs a warning per vision key it loads unchanged, and nests
progress bars that become escape-code soup in a log. Each entry below says why it is harmless
here. Anything not listed passes untouched, and ``set_verbose(True)`` (the CLI's ``--verbose``,
or ``CRAFT_VERBOSE=1`` in the environment, which stage processes inherit) turns every filter off.

Progress bars are separate: ``CRAFT_PROGRESS_BARS=0`` (the CLI's default, which draws its own one
line per stage) switches off craft's own bars and lerobot's rollout bars.
"""

import builtins
import functools
import logging
import os
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

VERBOSE_ENV = "CRAFT_VERBOSE"
PROGRESS_BARS_ENV = "CRAFT_PROGRESS_BARS"

# (logger name, message prefix, why it is harmless here)
KNOWN_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    ("root", "Vision embedding key might need handling",
     "pi0 / pi05 / pi0_fast from_pretrained log it for every vision patch-embedding key they load "
     "unchanged; craft checks that every weight loaded (policy_io._check_weights_loaded)"),
    ("lerobot.utils.import_utils", "torchcodec cannot be loaded here",
     "craft decodes video with pyav explicitly; lerobot only probes torchcodec for its default backend"),
)

# (printed text prefix, why it is harmless here): lerobot prints these from from_pretrained
KNOWN_PRINTS: tuple[tuple[str, str], ...] = (
    ("The PI0Fast model is a direct port of the OpenPI implementation", "attribution banner on every load"),
    ("The PI0 model is a direct port of the OpenPI implementation", "attribution banner on every load"),
    ("The PI05 model is a direct port of the OpenPI implementation", "attribution banner on every load"),
    ("Loading model from: ", "load chatter; craft names the checkpoint it loads in its own messages"),
    ("✓ Loaded state dict from model.safetensors", "load chatter; craft verifies the weights itself"),
    ("All keys loaded successfully!", "load chatter; craft verifies the weights itself"),
    ("Loading weights from local directory", "load chatter of PreTrainedPolicy.from_pretrained"),
    ("Reducing the number of VLM layers to ", "smolvla's model init restating its own num_vlm_layers setting"),
)

# (message regex, category, module regex, why it is harmless here)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r"pkg_resources is deprecated as an API", UserWarning, r"pygame(\.|$)",
     "pygame (imported by gym-pusht) still uses pkg_resources; nothing of it is used here"),
    (r"Cannot enable progress bars: environment variable `HF_DATASETS_DISABLE_PROGRESS_BARS=1`", UserWarning,
     r"datasets\.utils\.tqdm",
     "lerobot re-enables the datasets library's bars after each dataset it writes; the quiet command line "
     "keeps them off on purpose"),
    (r"Constant\(s\) may be too high", UserWarning, r"metaworld\.policies",
     "metaworld's scripted experts (demo recordings) use gains above 1 by design; the env and the "
     "recorder clip actions to [-1, 1]"),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def progress_bars() -> bool:
    """Whether craft's own and lerobot's tqdm bars are drawn (always in verbose mode)."""
    return verbose() or os.environ.get(PROGRESS_BARS_ENV, "1") != "0"


def set_verbose(on: bool) -> None:
    """Turn every filter of this module off (on=True) or back on; stage processes inherit it."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    _remove_warning_filters()
    if not on:
        _add_warning_filters()


def set_progress_bars(on: bool) -> None:
    os.environ[PROGRESS_BARS_ENV] = "1" if on else "0"


class KnownLogRecords(logging.Filter):
    """Drops the known records of one logger (see KNOWN_LOG_RECORDS) unless verbose."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        return not str(record.msg).startswith(self.prefixes)


_installed_warning_filters: list[tuple] = []


def _add_warning_filters() -> None:
    for message, category, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        _installed_warning_filters.append(warnings.filters[0])


def _remove_warning_filters() -> None:
    for entry in _installed_warning_filters:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    _installed_warning_filters.clear()
    warnings._filters_mutated()  # drop the per-module "already warned" caches


_filters: dict[str, KnownLogRecords] = {}


def install() -> None:
    """Install the log and warning filters (idempotent; done when craft_core is imported)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _why in KNOWN_LOG_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        if name not in _filters:
            _filters[name] = KnownLogRecords(tuple(prefixes))
            logging.getLogger(None if name == "root" else name).addFilter(_filters[name])
    if not verbose() and not _installed_warning_filters:
        _add_warning_filters()
    if not verbose():
        # pygame (imported by gym-pusht) prints a "Hello from the pygame community" banner on import
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")


_print_lock = threading.Lock()
_print_depth = 0
_print_saved = None


def _filtered_print(original, *args, **kwargs) -> None:
    text = kwargs.get("sep", " ").join(str(a) for a in args)
    if not verbose() and text.startswith(tuple(prefix for prefix, _why in KNOWN_PRINTS)):
        return
    original(*args, **kwargs)


@contextmanager
def quiet_prints() -> Iterator[None]:
    """Within the block, ``print`` drops the KNOWN_PRINTS lines (lerobot prints them from
    ``from_pretrained``) and passes everything else to the ``print`` in force (Prefect's
    print-as-log inside a run). Re-entrant and shared by threads: installed once while any block runs."""
    global _print_depth, _print_saved
    with _print_lock:
        if _print_depth == 0:
            _print_saved = builtins.print
            builtins.print = functools.partial(_filtered_print, _print_saved)
        _print_depth += 1
    try:
        yield
    finally:
        with _print_lock:
            _print_depth -= 1
            if _print_depth == 0:
                builtins.print = _print_saved
                _print_saved = None


@contextmanager
def lerobot_eval_bars() -> Iterator[None]:
    """Within the block, lerobot's rollout bars (``lerobot_eval.trange``: an outer bar per batch and a
    nested one per rollout, escape codes in a log) are off unless progress bars are on."""
    if progress_bars():
        yield
        return
    from lerobot.scripts import lerobot_eval

    original = lerobot_eval.trange
    lerobot_eval.trange = functools.partial(_quiet_trange, original)
    try:
        yield
    finally:
        lerobot_eval.trange = original


def _quiet_trange(original, *args, **kwargs):
    kwargs["disable"] = True
    return original(*args, **kwargs)


def describe() -> str:
    """The filtered output and why, one line each (for docs and ``--verbose`` help)."""
    lines = [f"log {name}: {prefix!r}: {why}" for name, prefix, why in KNOWN_LOG_RECORDS]
    lines += [f"print: {prefix!r}: {why}" for prefix, why in KNOWN_PRINTS]
    lines += [f"warning {re.sub(r'[^ -~]', '', message)!r}: {why}" for message, _c, _m, why in KNOWN_WARNINGS]
    return "\n".join(lines)
