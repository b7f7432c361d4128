"""Reading and validating dataset files: formats, auto-detection, bad rows, the built-in dataset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from qlorakit.config import DatasetSpec
from qlorakit.core.errors import DataError
from qlorakit.data import Message, builtin_path, load_records

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def load(path: Path, fmt: str = "auto", skip: bool = False):
    return load_records(DatasetSpec(path=str(path), format=fmt), skip_invalid=skip)


def test_alpaca_json_list_and_jsonl_read_the_same(tmp_path):
    rows = [
        {"instruction": "Reverse.", "input": "abc", "output": "cba", "id": 7, "extra": [1]},
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say yo.", "input": "", "output": "yo", "system": "Be brief."},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    a = load(tmp_path / "a.json")
    b = load(write_jsonl(tmp_path / "a.jsonl", rows))
    assert a.format == b.format == "alpaca"
    assert [r.messages for r in a.records] == [r.messages for r in b.records]
    first, second, third = a.records
    assert first.messages == (Message("user", "Reverse.\n\nabc"), Message("assistant", "cba"))
    assert first.instruction_input == ("Reverse.", "abc")
    assert second.messages == (Message("user", "Say hi."), Message("assistant", "hi"))
    assert second.instruction_input == ("Say hi.", "")
    assert third.messages[0] == Message("system", "Be brief.")
    assert a.records[1].source == f"{tmp_path / 'a.json'}[1]"
    assert b.records[1].source == f"{tmp_path / 'a.jsonl'}:2"


def test_chat_and_sharegpt(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    share = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "U1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "U2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    c = load(write_jsonl(tmp_path / "c.jsonl", [chat]))
    s = load(write_jsonl(tmp_path / "s.jsonl", [share]))
    assert (c.format, s.format) == ("chat", "sharegpt")
    assert c.records[0].messages == s.records[0].messages
    assert [m.role for m in c.records[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert c.records[0].instruction_input is None


def test_plain_text_paragraphs_and_text_jsonl(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("First line\nstill first.\n\n\nSecond para.\n  \nThird.\n")
    r = load(txt)
    assert r.format == "text"
    assert [x.text for x in r.records] == ["First line\nstill first.", "Second para.", "Third."]
    assert [x.source.rsplit(":", 1)[1] for x in r.records] == ["1", "5", "7"]
    j = load(write_jsonl(tmp_path / "t.jsonl", [{"text": "doc one"}, {"text": "doc two", "meta": 1}]))
    assert j.format == "text" and [x.text for x in j.records] == ["doc one", "doc two"]
    assert all(x.messages is None for x in j.records)
    with pytest.raises(DataError, match="plain-text file can only be read as format 'text'"):
        load(txt, "alpaca")


def test_undetectable_first_row(tmp_path):
    path = write_jsonl(
        tmp_path / "u.jsonl", [{"question": "x", "answer": "y"}, {"instruction": "x", "output": "y"}]
    )
    with pytest.raises(
        DataError, match=r"u\.jsonl:1: cannot tell the format from keys \['answer', 'question'\]"
    ):
        load(path)
    result = load(path, skip=True)  # detection moves on to the first valid row
    assert (result.format, result.skipped, len(result.records)) == ("alpaca", 1, 1)


def test_explicit_format_is_enforced(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'messages' must be a non-empty list"):
        load(path, "chat")


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": "x", "output": 5}, "field 'output' must be a string"),
    ({"instruction": "x", "output": "   "}, "field 'output' is empty"),
    ({"instruction": "", "output": "y"}, "field 'instruction' is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "does not end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        "assistant content is empty",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
        'string "role" and "content"',
    ),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "expected 'user'"),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
        "unknown role 'robot'",
    ),
    ({"text": ""}, "field 'text' is empty"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_ROWS)
def test_bad_row_names_file_line_and_fix_or_is_skipped(tmp_path, bad, problem):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "instruction" in str(bad) or "text" in str(bad):
        good = {"instruction": "q", "output": "a"} if "instruction" in str(bad) else {"text": "t"}
    if "conversations" in str(bad):
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", bad, good])  # the bad row is on line 3
    with pytest.raises(DataError) as err:
        load(path)
    message = str(err.value)
    assert f"{path}:3: " in message and problem in message
    assert "skip_invalid" in message  # names the way out
    result = load(path, skip=True)
    assert result.skipped == 1 and len(result.records) == 2


def test_bad_row_in_json_list_names_the_index(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]))
    with pytest.raises(DataError, match=r"a\.json\[1\]: missing field 'output'"):
        load(path)
    assert load(path, skip=True).skipped == 1
    path.write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(DataError, match=r"a\.json:2: invalid JSON"):
        load(path)


def test_missing_file_and_unsupported_inputs(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"{missing}: dataset file not found"):
        load(missing)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load(tmp_path / "x.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a `datasets` save_to_disk folder"):
        load(tmp_path / "folder")


def test_datasets_folder_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail as when not installed
    with pytest.raises(DataError, match=r"pip install datasets") as err:
        load(folder)
    assert str(folder) in str(err.value)


def test_skip_invalid_can_leave_nothing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{oops", {"instruction": "x", "output": ""}])
    result = load(path, skip=True)
    assert result.records == [] and result.skipped == 2


# ---------------------------------------------------------------------------------------------------------
# The built-in dataset.

CHECKS = {
    "reverse": lambda i: i[::-1],
    "uppercase": str.upper,
    "lowercase": str.lower,
    "spell": lambda i: "-".join(i),
    "count_letters": lambda i: str(len(i)),
    "last_letter": lambda i: i[-1],
    "next_letter": lambda i: chr(ord(i) + 1),
    "add": lambda i: str(sum(int(x) for x in i.split(" + "))),
    "subtract": lambda i: str(int(i.split(" - ")[0]) - int(i.split(" - ")[1])),
    "sort": lambda i: ", ".join(map(str, sorted(int(x) for x in i.split(", ")))),
    "largest": lambda i: str(max(int(x) for x in i.split(", "))),
    "longest_word": lambda i: max(i.split(", "), key=len),
    "count_words": lambda i: str(len(i.split())),
    "repeat": lambda i: " ".join([i] * 3),
}


def test_builtin_dataset_rows_are_correct_and_unique():
    result = load_records(DatasetSpec(path="builtin"))
    assert result.format == "alpaca" and result.skipped == 0 and len(result.records) == 400
    rows = [json.loads(line) for line in builtin_path().read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({(r["task"], r["input"]) for r in rows}) == len(rows)
    assert set(CHECKS) == {r["task"] for r in rows}
    for row in rows:
        assert row["output"] == "Answer: " + CHECKS[row["task"]](row["input"]), row["id"]
    for row in (r for r in rows if r["task"] == "longest_word"):
        lengths = sorted((len(w) for w in row["input"].split(", ")), reverse=True)
        assert lengths[0] > lengths[1], row["id"]


def test_builtin_dataset_is_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_builtin_dataset", ROOT / "scripts" / "make_builtin_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gen.jsonl"
    assert module.main(["--out", str(out)]) == 0
    assert out.read_bytes() == builtin_path().read_bytes()
    assert module.main(["--out", str(builtin_path()), "--check"]) == 0
    out.write_text("stale\n")
    assert module.main(["--out", str(out), "--check"]) == 1
