"""spectra.atomic: the one atomic writer. A failed write leaves the old file and no temporary; a folder swap
(committees) replaces the whole folder in one step and leaves nothing behind."""
from __future__ import annotations

import json
import threading

import pytest

from spectra.atomic import write_dir, write_json, write_text, write_with


def test_text_and_json_replace_atomically_and_failures_keep_the_old_file(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_with(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]   # no temporary left


def test_folder_swap_never_leaves_the_path_missing(tmp_path):
    target = tmp_path / "models"
    write_dir(target, lambda d: (d / "committee.json").write_text("1"))
    seen_missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not (target / "committee.json").exists():
                seen_missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for k in range(2, 40):
            write_dir(target, lambda d, k=k: (d / "committee.json").write_text(str(k)))
    finally:
        stop.set()
        watcher.join()
    assert (target / "committee.json").read_text() == "39"
    assert not seen_missing                      # renameat2(RENAME_EXCHANGE): no gap between old and new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
