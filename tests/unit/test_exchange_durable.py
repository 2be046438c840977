"""durable.py: a folder of many files is made durable with one syncfs, a file or a
few files with fsync each, and without syncfs (not Linux) with fsyncs from a pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.exchange import durable
from p2pnode.exchange.durable import FSYNC_MAX_FILES, TreeSync, sync_tree
from p2pnode.exchange.manifest import build_manifest


def _tree(root: Path, files: int) -> None:
    for i in range(files):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(b"x" * (i + 1))


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = durable._fsync_path

    def counting(path: str | Path) -> None:
        seen.append(Path(path))
        real(path)

    monkeypatch.setattr(durable, "_fsync_path", counting)
    return seen


@pytest.mark.skipif(durable._SYNCFS is None, reason="no syncfs here")
def test_many_files_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    _tree(root, FSYNC_MAX_FILES + 5)
    manifest, _ = build_manifest(root)
    seen = _count_fsyncs(monkeypatch)
    with TreeSync(root) as ts:
        ts.sync(root, manifest)
    assert seen == []


def test_without_syncfs_every_file_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "tree"
    _tree(root, FSYNC_MAX_FILES + 5)
    manifest, _ = build_manifest(root)
    monkeypatch.setattr(durable, "_SYNCFS", None)
    seen = _count_fsyncs(monkeypatch)
    sync_tree(root, manifest)
    assert sorted(seen) == sorted(p for p in root.rglob("*") if p.is_file())


def test_a_file_or_a_few_are_fsynced_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = tmp_path / "one.bin"
    single.write_bytes(b"data")
    few = tmp_path / "few"
    _tree(few, 3)
    seen = _count_fsyncs(monkeypatch)
    sync_tree(single, build_manifest(single)[0])
    sync_tree(few, build_manifest(few)[0])
    assert seen[0] == single and len(seen) == 4
