"""Content-addressed stage outputs: fingerprints, stage directories and completion manifests.

A stage's output lives in ``<artifacts_root>/<stage>/<fingerprint>/``. The fingerprint hashes

* the stage's config sections as canonical JSON without ``NON_SEMANTIC_SETTINGS`` (before
  ``${assets}`` is resolved, so the same config gives the same fingerprint wherever the artifacts
  live),
* the fingerprints of the stages it consumes (a changed upstream re-runs everything downstream),
* the stage's *code version*: a hash of the source of every ``craft_core`` module the module of
  the stage's function imports, found by walking the imports (modules loaded with importlib are
  listed in ``DYNAMIC_IMPORTS``), plus the lerobot / transformers versions that define the
  policies. Chosen over hand-bumped version constants
  because nobody forgets to bump it: editing ``losses.py`` re-runs training but not extraction. The source is hashed as its
  syntax tree without docstrings, so comment, docstring and formatting edits re-run nothing; any
  other edit re-runs the stages that import the module, which is the safe direction.

Completion is a ``manifest.json`` written last, atomically (temp file + ``os.replace``). A stage
works *in* its final directory rather than in a sibling that is renamed at the end, because stage
outputs embed their own absolute paths (tiny policies name their tokenizer folders, lerobot
checkpoints and Zarr stores record where they live) and a rename would leave those dangling.
Everything without a valid manifest is incomplete; the cache and train stages resume from that
partial content when run again. A lock file serialises two runs of the same stage fingerprint.
"""

import ast
import datetime as dt
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import resource
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from craft_core.config import semantic

MANIFEST = "manifest.json"
FINGERPRINT_LENGTH = 16
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = PACKAGE_ROOT.name

# Modules that import others with importlib -> the files they may import (globs under craft_core/).
DYNAMIC_IMPORTS: dict[str, tuple[str, ...]] = {
    "craft_core.demo.tiny.build": ("policies/*/tiny.py",),  # tiny builders by folder convention
}

# Libraries whose version changes what a stage computes (the policy classes themselves).
VERSIONED_LIBRARIES = ("lerobot", "transformers")


def canonical_json(value: Any, path: str = "") -> str:
    """Stable JSON of config data: sorted keys, no whitespace, non-semantic settings dropped."""
    return json.dumps(semantic(value, path), sort_keys=True, separators=(",", ":"), default=str)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Code version


def _module_path(module: str) -> Path | None:
    """Source file of a ``craft_core`` module name, or None if it is not one."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_ROOT).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _file_key(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


def _imported_modules(path: Path) -> set[str]:
    return _imported_modules_cached(*_file_key(path))


@functools.lru_cache(maxsize=1024)
def _imported_modules_cached(path: Path, mtime_ns: int, size: int) -> set[str]:
    """``craft_core`` modules imported anywhere in a file (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from craft_core import store` imports the submodule `craft_core.store`.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c also runs a/__init__ and a/b/__init__.
    closed = set()
    for module in found:
        parts = module.split(".")
        closed.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return {m for m in closed if _module_path(m) is not None}


def module_closure(entry_module: str) -> list[Path]:
    """Source files of ``entry_module`` and every ``craft_core`` module it (transitively) imports."""
    start = _module_path(entry_module)
    if start is None:
        raise ValueError(f"{entry_module!r} is not a module of {PACKAGE} (looked under {PACKAGE_ROOT})")
    seen: dict[Path, None] = {}
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        todo.extend(_module_path(m) for m in _imported_modules(path))
        # Modules that import others by name at run time (importlib), which no import statement
        # shows, count those modules explicitly.
        for pattern in DYNAMIC_IMPORTS.get(_module_name(path), ()):
            todo.extend(sorted(PACKAGE_ROOT.glob(pattern)))
    return sorted(seen)


def code_version(entry_module: str) -> str:
    """Hash of the sources a stage runs plus the versions of the libraries that define the policies."""
    digest = hashlib.sha256()
    for path in module_closure(entry_module):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0")
        digest.update(_code_text(path).encode() + b"\0")
    for library, version in _library_versions():
        digest.update(f"{library}=={version}\0".encode())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def _code_text(path: Path) -> str:
    return _code_text_cached(*_file_key(path))


@functools.lru_cache(maxsize=1024)
def _code_text_cached(path: Path, mtime_ns: int, size: int) -> str:
    """The module's syntax tree without docstrings: comments, docstrings and formatting edits
    do not change what a stage computes, so they must not invalidate its outputs."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    versions = []
    for library in VERSIONED_LIBRARIES:
        try:
            versions.append((library, importlib.metadata.version(library)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((library, "absent"))
    return tuple(versions)


def stage_fingerprint(stage: str, config: Any, upstream: dict[str, str] | None = None, code: str = "") -> str:
    """Fingerprint of one stage run: its config, its upstream fingerprints and its code version."""
    payload = {
        "stage": stage,
        "config": json.loads(canonical_json(config)),
        "upstream": dict(sorted((upstream or {}).items())),
        "code": code,
    }
    return _sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")))[:FINGERPRINT_LENGTH]


# ---------------------------------------------------------------------------------------------
# Stage directories


class IncompleteStageError(RuntimeError):
    pass


class StageDir:
    """``<artifacts_root>/<stage>/<fingerprint>/`` and its completion manifest."""

    def __init__(self, artifacts_root: str | Path, stage: str, fingerprint: str):
        self.root = Path(artifacts_root).resolve()
        self.stage = stage
        self.fingerprint = fingerprint
        self.path = self.root / stage / fingerprint
        self.manifest_path = self.path / MANIFEST
        self.lock_path = self.root / stage / f"{fingerprint}.lock"

    def __repr__(self) -> str:
        return f"StageDir({str(self.path)!r})"

    def manifest(self) -> dict | None:
        """The manifest if this stage is complete (and the manifest is its own), else None."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        ok = (
            manifest.get("complete") is True
            and manifest.get("stage") == self.stage
            and manifest.get("fingerprint") == self.fingerprint
        )
        return manifest if ok else None

    def is_complete(self) -> bool:
        return self.manifest() is not None

    def result(self) -> dict:
        manifest = self.manifest()
        if manifest is None:
            raise IncompleteStageError(
                f"stage '{self.stage}' has no complete output at {self.path} (no valid {MANIFEST}); "
                f"run the stage (e.g. include '{self.stage}' in `stages`)"
            )
        return manifest["result"]

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock so two runs of the same fingerprint never write the same directory.

        The lock file is removed by its holder on the way out, so none is left behind; a waiter
        that then holds a lock on the removed file notices (its path names another file or none)
        and locks again.
        """
        while True:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                handle = open(self.lock_path, "a")
            except FileNotFoundError:  # a failed run just removed the (empty) stage folder
                continue
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(self.lock_path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()  # the previous holder removed that file: lock the new one
        try:
            yield
        finally:
            try:
                self.lock_path.unlink()
            except FileNotFoundError:
                pass
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def discard_if_empty(self, *, stage_folder: bool = False) -> None:
        """Remove the output directory (with ``stage_folder``, ``<root>/<stage>/`` too) if a failed run
        left it empty; a partial output is kept, to be resumed."""
        for folder in (self.path, self.path.parent) if stage_folder else (self.path,):
            try:
                folder.rmdir()
            except FileNotFoundError:  # already gone
                continue
            except OSError:  # not empty
                return

    def begin(self) -> Path:
        """Create (or reuse, to resume) the working directory; it stays incomplete until commit()."""
        self.path.mkdir(parents=True, exist_ok=True)
        # A manifest left by another fingerprint's content must never make this one look done.
        if self.manifest_path.exists() and not self.is_complete():
            self.manifest_path.unlink()
        return self.path

    def commit(self, result: dict, *, config: Any = None, upstream: dict[str, str] | None = None,
               code: str = "", started: float | None = None, cpu_started: float | None = None) -> dict:
        """Write the manifest last and atomically: from here on the stage counts as complete."""
        now = time.time()
        manifest = {
            "complete": True,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "code_version": code,
            "upstream": upstream or {},
            "config": json.loads(canonical_json(config)) if config is not None else None,
            "result": result,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(now - started, 3) if started is not None else None,
            "cpu_s": round(_cpu_seconds() - cpu_started, 3) if cpu_started is not None else None,
            "host": socket.gethostname(),
        }
        tmp = self.path / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, self.manifest_path)
        return manifest


def run_stage(stage_dir: StageDir, fn, *, config: Any = None, upstream: dict[str, str] | None = None,
              code: str = "") -> tuple[dict, bool]:
    """Run ``fn(work_dir) -> result`` unless the stage is complete; returns (result, executed).

    A failure propagates without a manifest, so the partial directory is only ever resumed,
    never read as an output; a failure that wrote nothing leaves no directory (and no lock file).
    """
    try:
        with stage_dir.lock():
            manifest = stage_dir.manifest()
            if manifest is not None:
                return manifest["result"], False
            started, cpu_started = time.time(), _cpu_seconds()
            work_dir = stage_dir.begin()
            try:
                result = fn(work_dir)
            except BaseException:
                stage_dir.discard_if_empty()  # a refused input leaves nothing behind; a partial output stays
                raise
            stage_dir.commit(result, config=config, upstream=upstream, code=code, started=started,
                             cpu_started=cpu_started)
            return result, True
    except BaseException:
        stage_dir.discard_if_empty(stage_folder=True)  # after the lock file is gone
        raise


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (stages isolated in their own process)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
