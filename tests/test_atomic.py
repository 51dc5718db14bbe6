"""engine/atomic.write_atomic: the one way small files (settings, hashes, tokenizer files) are replaced."""
import pytest

import engine.atomic as atomic


def test_it_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "settings.json"
    atomic.write_atomic(target, "one")
    atomic.write_atomic(target, b"two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["settings.json"]


def test_a_failure_keeps_the_old_file_whole_and_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "settings.json"
    target.write_text("old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(OSError):
        atomic.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_two_writers_use_different_temp_names(tmp_path, monkeypatch):
    seen = []
    real_replace = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (seen.append(src), real_replace(src, dst)))
    atomic.write_atomic(tmp_path / "f", "a")
    atomic.write_atomic(tmp_path / "f", "b")
    assert len(set(seen)) == 2  # never a fixed ".tmp" name two processes could collide on
