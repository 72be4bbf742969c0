"""flashportrait.atomic: a complete write replaces the target; an interrupted one leaves the target as it was."""

from __future__ import annotations

import os

import pytest

from flashportrait.atomic import atomic_path, atomic_write_text


def test_complete_write_replaces_the_target_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and oct(os.stat(target).st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]
