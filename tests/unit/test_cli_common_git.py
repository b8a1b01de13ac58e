"""Provenance: the git commit recorded with runs says when the tree differs from it."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

from vlmfix import cli_common


def _fake_git(head: str | None, status: str, rc: int = 0):
    def run(cmd, **kwargs):
        if "rev-parse" in cmd:
            return SimpleNamespace(returncode=rc, stdout=(head or "") + "\n")
        assert "status" in cmd and "--untracked-files=no" in cmd
        return SimpleNamespace(returncode=0, stdout=status)

    return run


def test_clean_tree_records_the_commit(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_git("abc123", ""))
    assert cli_common.git_hash() == "abc123"


def test_changed_tracked_files_mark_the_commit_dirty(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_git("abc123", " M vlmfix/fastpath.py\n"))
    assert cli_common.git_hash() == "abc123-dirty"


def test_no_checkout_records_nothing(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_git(None, "", rc=128))
    assert cli_common.git_hash() is None

    def boom(*a, **k):
        raise OSError("no git")

    monkeypatch.setattr(subprocess, "run", boom)
    assert cli_common.git_hash() is None
