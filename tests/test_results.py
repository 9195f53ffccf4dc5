"""kvforge.results: one folder per run (never overwritten), one metadata dict, no absolute paths written."""

from __future__ import annotations

import json
import os

import pytest

from kvforge.results import (
    META_KEYS,
    Results,
    command_line,
    folder_name,
    metadata,
    new_results_dir,
    portable,
    relative,
)


def _settings(tmp_path):
    # paths of this machine on purpose: none of them may reach a results file
    return {"model": "tiny", "windows": 2, "text": str(tmp_path / "text.txt"), "out": tmp_path / "results",
            "variants": [str(tmp_path / "converted")]}


def test_same_settings_get_two_folders(tmp_path):
    s = _settings(tmp_path)
    name = folder_name("bench", s, "tiny", "w2")
    assert name == folder_name("bench", dict(s), "tiny", "w2")  # named after the settings: stable
    assert name != folder_name("bench", {**s, "windows": 3}, "tiny", "w2")
    a, b = Results(tmp_path / "results", name, s), Results(tmp_path / "results", name, s)
    a.write_table("| a |\n|---|\n| 1 |", rows=[{"a": 1}])
    b.write_table("| a |\n|---|\n| 2 |", rows=[{"a": 2}])
    assert a.folder != b.folder and a.folder.parent == b.folder.parent
    assert [a.folder.name, b.folder.name] == [name, name + "-2"]
    assert json.loads((a.folder / "results.json").read_text())["rows"] == [{"a": 1}]  # not overwritten
    assert new_results_dir(tmp_path / "results", name).name == name + "-3"


def test_nothing_written_makes_no_folder(tmp_path, capsys):
    r = Results(tmp_path / "results", "empty")
    assert "no results written" in r.announce()
    assert not (tmp_path / "results").exists()


def test_a_partial_file_is_removed_and_not_announced(tmp_path, capsys):
    r = Results(tmp_path / "results", "run")
    r.write_json("partial.json", {"rows": [1]})
    r.write_table("| a |\n|---|\n| 1 |", rows=[{"a": 1}])
    r.remove("partial.json")
    assert not (r.folder / "partial.json").exists() and (r.folder / "results.json").exists()
    assert "partial.json" not in r.announce() and [p.name for p in r.written] == ["results.md", "results.json"]


def test_metadata_keys(tmp_path):
    meta = metadata({"windows": 2})
    for key in META_KEYS:
        assert key in meta, key
    assert {"platform", "cpu_count"} <= set(meta["machine"])
    assert meta["settings"] == {"windows": 2} and isinstance(meta["threads"], int)
    r = Results(tmp_path, "run", {"windows": 2})
    r.write_json("results.json", {"rows": []})
    data = json.loads((r.folder / "results.json").read_text())
    assert set(META_KEYS) | {"settings", "seconds", "rows"} <= set(data)
    with pytest.raises(ValueError, match="metadata key"):
        r.write_json("bad.json", {"torch": "mine"})


def test_no_absolute_path_is_written(tmp_path, monkeypatch, capsys):
    s = _settings(tmp_path)
    monkeypatch.setattr("sys.argv", [str(tmp_path / "bench.py"), "--out", str(tmp_path / "results"),
                                     f"--text={tmp_path / 'text.txt'}", "--windows", "2"])
    r = Results(tmp_path / "results", folder_name("bench", s, "tiny"), s)
    inner = r.folder / "quality_run"
    rows = [{"cache": "dynamic", "folder": inner, "log": f"failed at {tmp_path / 'x.py'}: boom"},
            {"cache": "q", "nested": {"dir": str(tmp_path / "converted")}}]
    written = r.write_table("table, from `" + str(r.folder / "quality_run") + "`", rows=rows, with_csv=True,
                            quality=str(inner))
    assert [p.name for p in written] == ["results.md", "results.json", "results.csv"]
    roots = {str(tmp_path), os.path.realpath(tmp_path), os.getcwd(), os.path.expanduser("~")}
    for p in written:
        text = p.read_text()
        for root in roots:
            assert root not in text, (p.name, root)
    data = json.loads((r.folder / "results.json").read_text())
    assert data["quality"] == "quality_run"  # relative to the results folder
    assert data["settings"]["text"] == "text.txt"  # outside project and folder: its name only
    assert data["command"].startswith("python bench.py --out results")
    assert "results in " in r.announce() and "results.csv" in capsys.readouterr().err


def test_relative_paths():
    cwd = os.getcwd()
    assert relative(os.path.join(cwd, "benchmarks", "results")) == "benchmarks/results"
    assert relative("benchmarks/results") == "benchmarks/results"
    assert portable({"a": [cwd + "/x", "not/abs", 3]}) == {"a": ["x", "not/abs", 3]}
    assert command_line([os.path.join(cwd, "src", "kvforge", "__main__.py"), "bench"]) == "python -m kvforge bench"


def test_committed_results_hold_no_absolute_machine_paths():
    """Results are shared: a path of the machine that made them (its home, work or temporary folders) says
    nothing to a reader and leaks the machine's layout."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    pattern = re.compile(r"(?<![\w.])/(?:work|root|home|tmp|Users|private)/")
    bad = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".json", ".md", ".csv")
           and pattern.search(p.read_text(errors="replace"))]
    assert not bad, f"absolute machine paths in {bad}"
