"""Write-then-rename outputs (data_pipeline/atomic.py): their own failures name the output."""
from __future__ import annotations

import pytest

from data_pipeline.atomic import OutputNotWritableError, OutputWriteError, atomic_file


def test_an_output_that_cannot_be_made_is_named_not_its_temporary_file(tmp_path):
    (tmp_path / "afile").write_text("a file where a directory would be")
    out = tmp_path / "afile" / "report.html"
    with pytest.raises(OutputWriteError) as info:
        with atomic_file(out, force=True):
            pass
    assert str(info.value).startswith(f"{out}: cannot write (") and ".tmp" not in str(info.value)


def test_a_directory_is_never_replaced_by_an_output_file(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("kept")
    with pytest.raises(OutputNotWritableError, match="a directory, and this output is a file"):
        with atomic_file(tmp_path / "adir", force=True) as tmp:
            tmp.write_text("new")
    assert (tmp_path / "adir" / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"], "no temporary file left"
