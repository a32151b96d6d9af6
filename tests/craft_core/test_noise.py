"""The filters of known, harmless lerobot output drop exactly that output, and --verbose brings it back."""

import logging
import warnings

import pytest

from craft_core import noise


@pytest.fixture
def quiet():
    before = noise.verbose()
    noise.set_verbose(False)
    yield
    noise.set_verbose(before)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=0)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def root_records():
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


def test_known_lerobot_log_records_are_dropped_and_others_kept(quiet, root_records):
    # lerobot logs these with logging.warning(...): the root logger
    logging.warning("Vision embedding key might need handling: model.vision_tower.patch_embedding.weight")
    logging.warning("Vision tower weights are missing")  # not known: must pass
    logging.getLogger("lerobot.policies").warning("Vision embedding key might need handling: elsewhere")
    assert root_records == ["Vision tower weights are missing", "Vision embedding key might need handling: elsewhere"]


def test_verbose_brings_the_known_records_back(quiet, root_records):
    noise.set_verbose(True)
    logging.warning("Vision embedding key might need handling: k")
    assert root_records == ["Vision embedding key might need handling: k"]


def test_known_prints_are_dropped_only_inside_policy_loading(quiet, capsys):
    with noise.quiet_prints():
        print("The PI0Fast model is a direct port of the OpenPI implementation. \nThis implementation ...")
        print("All keys loaded successfully!")
        print("Missing keys: ['lm_head.weight']")  # not known: must pass
        with noise.quiet_prints():  # nested (a load inside a load) keeps the filter until the outer block ends
            print("Loading model from: /some/folder")
        print("✓ Loaded state dict from model.safetensors")
    print("All keys loaded successfully!")  # outside a load: untouched
    assert capsys.readouterr().out == "Missing keys: ['lm_head.weight']\nAll keys loaded successfully!\n"
    noise.set_verbose(True)
    with noise.quiet_prints():
        print("All keys loaded successfully!")
    assert capsys.readouterr().out == "All keys loaded successfully!\n"


def test_known_warning_is_ignored_only_from_its_module(quiet):
    message = "pkg_resources is deprecated as an API. See https://setuptools.pypa.io"
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, UserWarning, "pkgdata.py", 25, module="pygame.pkgdata")
        warnings.warn_explicit(message, UserWarning, "mine.py", 1, module="mypackage")  # another module: kept
        warnings.warn_explicit("something else", UserWarning, "pkgdata.py", 26, module="pygame.pkgdata")  # kept
    assert [(str(w.message)[:14], w.filename) for w in caught] == [
        ("pkg_resources ", "mine.py"), ("something else", "pkgdata.py")]
    noise.set_verbose(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, UserWarning, "pkgdata.py", 27, module="pygame.pkgdata")
    assert len(caught) == 1


def test_progress_bars_follow_the_environment(monkeypatch):
    monkeypatch.setenv(noise.PROGRESS_BARS_ENV, "0")
    monkeypatch.setenv(noise.VERBOSE_ENV, "0")
    assert not noise.progress_bars()
    monkeypatch.setenv(noise.VERBOSE_ENV, "1")
    assert noise.progress_bars()  # verbose shows everything
    monkeypatch.delenv(noise.PROGRESS_BARS_ENV)
    monkeypatch.setenv(noise.VERBOSE_ENV, "0")
    assert noise.progress_bars()  # bars are on unless switched off (library use, experiments)


def test_lerobot_rollout_bars_are_off_only_inside_the_block_when_bars_are_off(monkeypatch):
    from lerobot.scripts import lerobot_eval

    monkeypatch.setenv(noise.VERBOSE_ENV, "0")
    monkeypatch.setenv(noise.PROGRESS_BARS_ENV, "0")
    with noise.lerobot_eval_bars():
        assert lerobot_eval.trange(2).disable
    assert not lerobot_eval.trange(2, disable=False).disable  # restored
    monkeypatch.setenv(noise.PROGRESS_BARS_ENV, "1")
    with noise.lerobot_eval_bars():
        assert not lerobot_eval.trange(2, disable=False).disable
