"""The one output rule (`qlorakit.core.outputs`) on plain folders and files, without a model: what each kind of
target gets, stale temporaries of killed writers, read-only locations and a disk that fills up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers.filesystems import temporaries
from qlorakit.core.atomic import make_temp_dir
from qlorakit.core.outputs import (
    MARKER,
    OutputError,
    check_output,
    output_file,
    output_folder,
    own_file_command,
    read_marker,
)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_new_empty_and_own_folders_are_written_foreign_ones_refused(tmp_path):
    with output_folder(check_output(tmp_path / "new", command="demo")) as tmp:
        (tmp / "a.txt").write_text("1")
    assert read_marker(tmp_path / "new") == {"written_by": "qlorakit", "command": "demo", "files": ["a.txt"]}
    (tmp_path / "empty").mkdir()
    with output_folder(check_output(tmp_path / "empty", command="demo")) as tmp:
        (tmp / "b.txt").write_text("2")
    with output_folder(check_output(tmp_path / "new", command="demo")) as tmp:  # its own: replaced whole
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [MARKER, "c.txt"]
    (tmp_path / "new" / "mine.txt").write_text("the user's")  # the user added a file: no longer ours alone
    with pytest.raises(OutputError, match=r"did not write \(mine.txt\).*--overwrite"):
        check_output(tmp_path / "new", command="demo")
    with pytest.raises(OutputError, match="did not write"):  # another command's folder is not ours
        check_output(tmp_path / "empty", command="other")
    assert check_output(tmp_path / "new", command="demo", overwrite=True).overwrite


def test_a_folder_filled_in_place_tolerates_the_users_files_once_it_is_ours(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes.txt.*to write into it"):
        check_output(folder, command="train", mode="update")
    from qlorakit.core.outputs import claim_folder

    claim_folder(check_output(folder, command="train", mode="update", overwrite=True), ["metrics.jsonl"])
    check_output(folder, command="train", mode="update")  # now it is train's: resumes write into it
    assert (folder / "notes.txt").read_text() == "mine"


def test_inputs_and_folders_above_them_are_never_targets(tmp_path):
    model = tmp_path / "project" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for target, how in ((model, "is"), (tmp_path / "project", "contains"), (tmp_path, "contains")):
        with pytest.raises(OutputError, match=f"{how} the input .*even with --overwrite"):
            check_output(target, command="demo", inputs=[model], overwrite=True)
    with pytest.raises(OutputError, match="is part of the input"):  # replacing a file of the input
        check_output(model / "config.json", command="demo", kind="file", inputs=[model], overwrite=True)
    check_output(model / "model.gguf", command="demo", kind="file", inputs=[model])  # a new file beside it
    check_output(tmp_path / "elsewhere", command="demo", inputs=[model, None, "builtin", "smollm2-135m"])


def test_files_and_folders_never_replace_each_other(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a file and demo writes a folder"):
        check_output(tmp_path / "file.bin", command="demo", overwrite=True)
    with pytest.raises(OutputError, match=r"is a folder and demo writes a file.*dir/output.gguf"):
        check_output(tmp_path / "dir", command="demo", kind="file", overwrite=True, suffix=".gguf")
    with pytest.raises(OutputError, match="file.bin is a file, not a folder"):
        check_output(tmp_path / "file.bin" / "sub" / "out", command="demo")


def test_own_files_are_recognised_by_their_signature(tmp_path):
    from qlorakit.core.outputs import json_signature

    target = tmp_path / "report.json"
    target.write_text(json.dumps({"results": []}))
    with pytest.raises(OutputError, match="was not written by qlorakit demo"):
        check_output(target, command="demo", kind="file")
    with output_file(check_output(target, command="demo", kind="file", overwrite=True)) as fh:
        fh.write(json.dumps({**json_signature("demo"), "results": []}).encode())
    assert own_file_command(target) == "demo"
    check_output(target, command="demo", kind="file")  # its own file: replaced without asking
    with pytest.raises(OutputError):
        check_output(target, command="other", kind="file")


def test_stale_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    """A writer SIGKILLed mid-write leaves `.out.qlorakit-PID-*.tmp`; the next check of `out` removes it."""
    code = (
        "import os, signal, sys; from pathlib import Path; from qlorakit.core.atomic import make_temp_dir\n"
        "tmp = make_temp_dir(Path(sys.argv[1]), 'out'); (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=ENV)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = temporaries(tmp_path)
    live = make_temp_dir(tmp_path, "out")  # this process's own temporary: its writer is alive
    (tmp_path / ".out.backup.tmp").mkdir()  # the user's hidden folder: not our naming
    (tmp_path / ".other.qlorakit-1-abc.tmp").mkdir()  # a temporary of another target
    check_output(tmp_path / "out", command="demo")
    assert not stale.exists()
    assert live.exists() and (tmp_path / ".out.backup.tmp").exists()
    assert (tmp_path / ".other.qlorakit-1-abc.tmp").exists()


def test_a_read_only_location_is_refused_before_any_work(read_only_dir):
    with pytest.raises(OutputError, match="cannot write in"):
        check_output(read_only_dir / "out", command="demo")
    with pytest.raises(OutputError, match="cannot write in"):
        check_output(read_only_dir / "a" / "b.gguf", command="demo", kind="file")


def test_a_full_disk_while_writing_is_a_named_error_with_the_size_needed(small_disk):
    disk = small_disk(64 * 1024)
    plan = check_output(disk / "out", command="demo")  # no estimate: the check cannot know
    message = r"disk filled up .*nothing was written under that name"
    with pytest.raises(OutputError, match=message), output_folder(plan) as tmp:
        (tmp / "weights.bin").write_bytes(os.urandom(1 << 20))
    assert list(disk.iterdir()) == []
    with pytest.raises(OutputError, match=r"needs about 1.0 MiB but only .* is free"):
        check_output(disk / "out", command="demo", need_bytes=1 << 20)
