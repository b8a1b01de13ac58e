"""Run metadata for self-describing results files."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import logging
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["collect_metadata", "git_hash"]

logger = logging.getLogger(__name__)

_PACKAGES = ("torch", "transformers", "accelerate", "pycocotools", "pillow")


def git_hash(start: str | Path | None = None) -> str | None:
    """Return the commit hash of the repository holding ``start`` (default: vlmfix).

    Reads ``.git`` directly (HEAD, loose refs, packed-refs); returns None outside a
    repository. A worktree with uncommitted changes still reports its HEAD.
    """
    here = Path(start or __file__).resolve()
    for parent in [here, *here.parents]:
        git = parent / ".git"
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            text = git.read_text().strip()
            if text.startswith("gitdir:"):
                git = (parent / text.split(":", 1)[1].strip()).resolve()
        if git.is_dir():
            return _resolve_head(git)
    return None


def _resolve_head(git: Path) -> str | None:
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head or None
    ref = head.split(":", 1)[1].strip()
    for base in (git, _common_dir(git)):
        loose = base / ref
        if loose.is_file():
            return loose.read_text().strip() or None
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    return None


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    if common.is_file():
        return (git / common.read_text().strip()).resolve()
    return git


def collect_metadata(
    model_id: str | None,
    methods: list[Any] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> dict:
    """Return versions, git hash, device, model id, method configs and seed of a run.

    Uses the core's ``vlmfix.cli_common.run_metadata`` when it is available and adds
    the evaluation's own packages (pycocotools, accelerate), platform and time.
    """
    import vlmfix

    meta: dict[str, Any] = {}
    try:
        from vlmfix.cli_common import run_metadata
    except ImportError:
        run_metadata = None
    if run_metadata is not None:
        try:
            meta.update(run_metadata(model_id, methods or [], seed, device=device))
        except Exception as exc:  # metadata must never lose a finished run
            logger.warning("run_metadata failed (%s); using vlmfix.eval's own metadata", exc)
    versions = dict(meta.get("versions") or {})
    versions.setdefault("vlmfix", getattr(vlmfix, "__version__", "unknown"))
    versions.setdefault("python", sys.version.split()[0])
    for pkg in _PACKAGES:
        if pkg not in versions:
            try:
                versions[pkg] = _md.version(pkg)
            except _md.PackageNotFoundError:
                versions[pkg] = None
    meta["versions"] = versions
    if "git" not in meta:
        meta["git"] = git_hash()
    meta.setdefault("model", model_id)
    meta.setdefault("methods", [_method_dict(m) for m in methods or []])
    meta.setdefault("seed", seed)
    if device is not None:
        meta.setdefault("device", device)
    meta["platform"] = platform.platform()
    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return meta


def _method_dict(m: Any) -> Any:
    if hasattr(m, "to_dict"):
        return {"name": getattr(m, "name", type(m).__name__), **m.to_dict()}
    return m
