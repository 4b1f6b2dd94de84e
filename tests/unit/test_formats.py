"""Reading every file type, detecting and normalising every record shape, locating bad rows."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsft.data.formats import DataError, load_examples, read_jsonl

KINDS = ["jsonl", "jsonl.gz", "json", "json-wrapped", "json-lines", "csv", "parquet", "disk"]


def write(tmp: Path, kind: str, records: list[dict[str, Any]], stem: str = "d") -> tuple[str, str]:
    """Write records as one file type; returns (path, source of the second record)."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if kind == "jsonl":
        (p := tmp / f"{stem}.jsonl").write_text(lines)
    elif kind == "jsonl.gz":
        (p := tmp / f"{stem}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    elif kind == "json":
        (p := tmp / f"{stem}.json").write_text(json.dumps(records, indent=2))
    elif kind == "json-wrapped":
        (p := tmp / f"{stem}.json").write_text(json.dumps({"version": 1, "data": records}))
    elif kind == "json-lines":
        (p := tmp / f"{stem}.json").write_text(lines)
    elif kind == "csv":
        p = tmp / f"{stem}.csv"
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            for r in records:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), p := tmp / f"{stem}.parquet")
    else:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(p := tmp / stem))
    second = {"csv": ":3", "jsonl": ":2", "jsonl.gz": ":2", "json-lines": ":2"}.get(kind, ":row 2")
    return str(p), str(p) + second


SYS = {"role": "system", "content": "Be brief."}
CASES: dict[str, tuple[list[dict[str, Any]], list[list[dict[str, str]]], str]] = {
    "instruction": (
        [
            {"instruction": "Add", "input": "1 2", "output": "3"},
            {"instruction": "Greet", "input": "", "output": "Hello"},
        ],
        [
            [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}],
            [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hello"}],
        ],
        "chat",
    ),
    "chat": (
        [
            {
                "messages": [
                    SYS,
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            {
                "messages": [
                    {"role": "system", "content": ""},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": ""},
                    {"role": "assistant", "content": "a2"},
                ]
            },
        ],
        [
            [SYS, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            [
                {"role": "system", "content": ""},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "a2"},
            ],
        ],
        "chat",
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            {
                "conversations": [
                    {"from": "user", "value": "q"},
                    {"from": "assistant", "value": "b"},
                ]
            },
        ],
        [
            [SYS, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        ],
        "chat",
    ),
    "prompt_completion": (
        [{"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": " five"}],
        [
            [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
            [{"role": "user", "content": ""}, {"role": "assistant", "content": " five"}],
        ],
        "completion",
    ),
    "text": (
        [{"text": "Once upon a time."}, {"text": "The end."}],
        [
            [{"role": "assistant", "content": "Once upon a time."}],
            [{"role": "assistant", "content": "The end."}],
        ],
        "text",
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", list(CASES))
def test_each_format_from_each_file_type(tmp_path: Path, kind: str, fmt: str) -> None:
    records, expected, example_kind = CASES[fmt]
    path, second = write(tmp_path, kind, records)
    for forced in ("auto", fmt):
        loaded = load_examples([path], forced)
        assert [e.messages for e in loaded.examples] == expected
        assert {e.kind for e in loaded.examples} == {example_kind}
        assert loaded.examples[1].source == second and loaded.skipped == []
        assert loaded.examples[0].dataset == "d"


def test_auto_detection_per_record_and_priority(tmp_path: Path) -> None:
    rows = [
        # alpaca datasets often carry a pre-formatted `text` column: still instruction
        {"instruction": "i", "output": "o", "text": "### i ### o"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "p", "completion": "c", "text": "pc"},
        {"text": "t"},
    ]
    path, _ = write(tmp_path, "jsonl", rows)
    kinds = [(e.kind, e.messages[-1]["content"]) for e in load_examples([path]).examples]
    assert kinds == [("chat", "o"), ("chat", "a"), ("completion", "c"), ("text", "t")]
    # forcing a format reads every row that way, whatever else it holds
    one, _ = write(tmp_path, "jsonl", rows[:1], stem="one")
    assert load_examples([one], "text").examples[0].messages[0]["content"] == "### i ### o"
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'text'"):
        load_examples([path], "text")


def test_column_remap_top_level_and_nested(tmp_path: Path) -> None:
    path, _ = write(tmp_path, "csv", [{"question": "q", "context": "", "answer": "a"}])
    ex = load_examples(
        [path], columns={"instruction": "question", "input": "context", "output": "answer"}
    )
    assert ex.examples[0].messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    dialog = [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]
    path, _ = write(tmp_path, "parquet", [{"dialog": dialog, "id": 1}])
    cols = {"messages": "dialog", "role": "speaker", "content": "text"}
    assert load_examples([path], columns=cols).examples[0].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    with pytest.raises(DataError, match=r"row 1: missing field 'turns' \(data.columns.messages\)"):
        load_examples([path], columns={**cols, "messages": "turns"})


def test_sharegpt_with_role_content_keys(tmp_path: Path) -> None:
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path, _ = write(tmp_path, "jsonl", [{"conversations": conv}])
    assert load_examples([path]).examples[0].messages == conv


def test_prompt_completion_conversational(tmp_path: Path) -> None:
    prompt = [SYS, {"role": "user", "content": "q"}]
    completion = [{"role": "assistant", "content": "a"}]
    for kind in ("jsonl", "parquet"):
        path, _ = write(tmp_path, kind, [{"prompt": prompt, "completion": completion}])
        (ex,) = load_examples([path]).examples
        assert ex.kind == "chat" and ex.messages == prompt + completion
    path, _ = write(tmp_path, "jsonl", [{"prompt": prompt, "completion": "a"}])
    with pytest.raises(DataError, match="both be strings or both be lists"):
        load_examples([path])


def test_null_and_nan_optional_input_is_empty(tmp_path: Path) -> None:
    rows = [
        {"instruction": "a", "input": None, "output": "b"},
        {"instruction": "c", "input": math.nan, "output": "d"},
    ]
    path, _ = write(tmp_path, "parquet", rows)
    assert [e.messages[0]["content"] for e in load_examples([path]).examples] == ["a", "c"]


def test_csv_lines_count_physical_lines_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes(b'\xef\xbb\xbftext,other\n"two\nlines",x\n\nthird,y\n')
    exs = load_examples([str(p)]).examples
    assert [(e.messages[0]["content"], e.source) for e in exs] == [
        ("two\nlines", f"{p}:2"),
        ("third", f"{p}:5"),
    ]


def test_dataset_dict_uses_train_split(tmp_path: Path) -> None:
    import datasets

    rows = {s: datasets.Dataset.from_list([{"text": s}]) for s in ("train", "test")}
    datasets.DatasetDict(rows).save_to_disk(str(tmp_path / "dd"))
    (ex,) = load_examples([str(tmp_path / "dd")]).examples
    assert ex.messages[0]["content"] == "train" and ex.source == f"{tmp_path / 'dd'}:row 1"


OK = {"instruction": "ok", "output": "ok"}


def chat(*turns: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def bad(case: str, name: str, contents: Any, *needles: str, **kwargs: Any) -> Any:
    """contents: bytes, records (written as jsonl or parquet), "mkdir", or None (no file)."""
    return pytest.param(name, contents, kwargs, needles, id=case)


BAD = [
    bad("malformed json line", "d.jsonl", b'{"text": "ok"}\n{"text": \n',
        "d.jsonl:2: not valid JSON", "column 10"),
    bad("missing field", "d.jsonl", [OK, {"instruction": "a"}],
        "d.jsonl:2: missing field 'output'; the row has instruction"),
    bad("wrong type", "d.jsonl", [OK, {"instruction": "a", "output": 3}],
        "d.jsonl:2: field 'output' must be a string, got a number (3)"),
    bad("null value", "d.jsonl", [OK, {"instruction": None, "output": "b"}],
        "d.jsonl:2: field 'instruction' must be a string, got null"),
    bad("not an object", "d.jsonl", b'{"text": "ok"}\n[1, 2]\n',
        "d.jsonl:2: expected an object, got a list"),
    bad("unknown role", "d.jsonl", [OK, chat(("user", "q"), ("robot", "a"))],
        "d.jsonl:2: messages[1].role: 'robot' is not one of system, user, assistant"),
    bad("null content", "d.jsonl", [OK, chat(("user", None), ("assistant", "a"))],
        "d.jsonl:2: messages[0].content: must be a string or a list of content parts, got null"),
    bad("null response", "d.jsonl", [OK, chat(("user", "q"), ("assistant", None))],
        "d.jsonl:2: messages[1].content: empty assistant response"),
    bad("empty response", "d.jsonl", [OK, chat(("user", ""), ("assistant", " \n"))],
        "d.jsonl:2: messages[1].content: empty assistant response"),
    bad("empty output", "d.jsonl", [OK, {"instruction": "a", "output": ""}],
        "d.jsonl:2: field 'output': empty response"),
    bad("no assistant turn", "d.jsonl", [OK, chat(("system", "s"), ("user", "q"))],
        "d.jsonl:2: field 'messages': no assistant message"),
    bad("empty messages", "d.jsonl", [OK, {"messages": []}],
        "d.jsonl:2: field 'messages' is an empty list"),
    bad("late system", "d.jsonl", [OK, chat(("user", "q"), ("system", "s"), ("assistant", "a"))],
        "d.jsonl:2: messages[1].role: a system message may only come first"),
    bad("sharegpt from", "d.jsonl", [OK, {"conversations": [{"from": "bot", "value": "x"}]}],
        "d.jsonl:2: conversations[0].from: 'bot' is not one of system, human, user, gpt, "),
    bad("non-utf8 jsonl", "d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n',
        "d.jsonl:2: not valid UTF-8 (byte 0xff at column 11)"),
    bad("non-utf8 json", "d.json", b'[\n{"text": "ok"},\n{"text": "\xfe"}\n]',
        "d.json:3: not valid UTF-8 (byte 0xfe at column 11)"),
    bad("non-utf8 csv", "d.csv", b"text\nok\nb\xffd\n", "d.csv:3: column 'text': not valid UTF-8"),
    bad("malformed json doc", "d.json", b'[{"text": "a"},\n {"text": }]',
        "d.json:2: not valid JSON", "column 11"),
    bad("several lists", "d.json", b'{"a": [], "b": []}',
        "d.json: a JSON object with several lists (a, b)"),
    bad("empty file", "d.jsonl", b"", "d.jsonl: no rows"),
    bad("blank lines only", "d.jsonl", b"\n \n", "d.jsonl: no rows"),
    bad("empty json array", "d.json", b"[]", "d.json: no rows"),
    bad("header-only csv", "d.csv", b"text\n", "d.csv: no rows"),
    bad("unknown shape", "d.jsonl", [OK, {"question": "q", "answer": "a"}],
        "d.jsonl:2: cannot tell the format (fields: question, answer)", "data.format",
        "data.columns"),
    bad("unknown data.format", "d.jsonl", [OK], "data.format: 'alpaca' is not one of",
        fmt="alpaca"),
    bad("forced format mismatch", "d.jsonl", [OK], "d.jsonl:1: missing field 'messages'",
        fmt="chat"),
    bad("missing file", "nope.jsonl", None, "nope.jsonl: file not found"),
    bad("unknown extension", "d.txt", b"hello", "d.txt: unsupported file type '.txt'", ".jsonl",
        ".parquet", "save_to_disk"),
    bad("plain directory", "dir", "mkdir",
        "dir: a directory, but not one written by datasets' save_to_disk"),
    bad("csv bad row", "d.csv", b"instruction,output\na,b\nc,d,e\n",
        "d.csv:3: 3 cells, but the header has 2"),
    bad("csv bad json cell", "d.csv", b'messages\n"[{""role"": ""user"""\n',
        "d.csv:2: field 'messages': a string that is not valid JSON"),
    bad("parquet null", "d.parquet", [OK, {"instruction": "a", "output": None}],
        "d.parquet:row 2: field 'output' must be a string, got null"),
    bad("remapped column missing", "d.jsonl", [{"question": "q", "reply": "r"}],
        "d.jsonl:1: missing field 'answer' (data.columns.output); the row has question, reply",
        columns={"instruction": "question", "output": "answer"}),
    bad("remapped nested role", "d.jsonl", [{"dialog": [{"who": "robot", "content": "x"}]}],
        "d.jsonl:1: dialog[0].who: 'robot' is not one of",
        columns={"messages": "dialog", "role": "who"}),
    bad("gzip corrupt", "d.jsonl.gz", b"not gzip at all", "d.jsonl.gz: cannot read"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "contents", "kwargs", "needles"), BAD)
def test_bad_input_is_located(
    tmp_path: Path, name: str, contents: Any, kwargs: dict[str, Any], needles: tuple[str, ...]
) -> None:
    p = tmp_path / name
    if isinstance(contents, bytes):
        p.write_bytes(contents)
    elif contents == "mkdir":
        p.mkdir()
    elif contents is not None:
        write(tmp_path, "parquet" if name.endswith(".parquet") else "jsonl", contents)
    with pytest.raises(DataError) as e:
        load_examples([str(p)], **kwargs)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_dataset_dict_without_train_lists_splits(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"text": "x"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        DataError, match=r"dd: a DatasetDict without a 'train' split \(splits: validation\)"
    ):
        load_examples([str(tmp_path / "dd")])


def test_skip_counts_and_explains_bad_rows(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_bytes(
        b'{"text": "a"}\n{"text": \n{"instruction": "x", "output": 5}\n{"text": "b"}\n\xff\n'
    )
    c = tmp_path / "s.csv"
    c.write_text("prompt,completion\np,c\np,c,extra\n")
    loaded = load_examples([str(p), str(c)], on_bad_row="skip")
    assert [e.source for e in loaded.examples] == [f"{p}:1", f"{p}:4", f"{c}:2"]
    assert [s.split(": ", 1)[0] for s in loaded.skipped] == [f"{p}:2", f"{p}:3", f"{p}:5", f"{c}:3"]
    assert (
        "not valid JSON" in loaded.skipped[0] and "'output' must be a string" in loaded.skipped[1]
    )
    with pytest.raises(DataError, match=r"s\.jsonl:2: not valid JSON"):
        load_examples([str(p)])  # the default policy stops at the first bad row


def test_skip_still_raises_for_file_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{"question": 1}\n')
    with pytest.raises(
        DataError, match=r"all 2 rows are bad(.|\n)*bad\.jsonl:1(.|\n)*bad\.jsonl:2"
    ):
        load_examples([str(bad)], on_bad_row="skip")
    (tmp_path / "empty.csv").write_text("")
    for name in ("empty.csv", "missing.jsonl"):
        with pytest.raises(DataError, match=name):
            load_examples([str(tmp_path / name)], on_bad_row="skip")


def test_no_traceback_from_pathological_data(tmp_path: Path, monkeypatch) -> None:
    """Deep nesting, enormous lines, odd encodings, lone surrogates: located messages."""
    from dsft.data import readers

    ok = '{"instruction": "q", "output": "a"}\n'
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    (j := tmp_path / "deep.jsonl").write_text(ok + deep)
    with pytest.raises(DataError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        load_examples([str(j)])
    assert (
        load_examples([str(j)], on_bad_row="skip")
        .skipped[0]
        .endswith("nested too deeply (deeper than Python's recursion limit)")
    )
    (a := tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: JSON nested too deeply"):
        load_examples([str(a)])
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 64)
    (big := tmp_path / "big.jsonl").write_text(ok + '{"text": "' + "x" * 500 + '"}\n' + ok)
    loaded = load_examples([str(big)], on_bad_row="skip")
    assert len(loaded.examples) == 2 and loaded.skipped == [f"{big}:2: a line longer than 0 MiB"]
    monkeypatch.undo()
    (u16 := tmp_path / "u16.jsonl").write_bytes(ok.encode("utf-16"))
    with pytest.raises(DataError, match=r"u16\.jsonl: the file is UTF-16-encoded"):
        load_examples([str(u16)])
    (lat := tmp_path / "latin.jsonl").write_bytes(
        ok.encode() + '{"text": "café"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_examples([str(lat)])
    (sur := tmp_path / "sur.jsonl").write_text(ok + '{"instruction": "q\\ud800", "output": "a"}\n')
    with pytest.raises(DataError, match=r"sur\.jsonl:2: .*unpaired surrogate \\ud800"):
        load_examples([str(sur)])


def test_instruction_and_chat_records(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        '{"instruction": "Do", "input": "x", "output": "y"}\n'
        "\n"
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},'
        ' {"role": "assistant", "content": "a"}]}\n'
    )
    exs = read_jsonl(f)
    assert exs[0].messages == [
        {"role": "user", "content": "Do\n\nx"},
        {"role": "assistant", "content": "y"},
    ]
    assert exs[1].messages[0]["role"] == "system"
    assert exs[1].source.endswith("mixed.jsonl:3")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"instruction": "a"}', "bad.jsonl:2: missing field 'output'"),
        ('{"instruction": "a", "output": 3}', "bad.jsonl:2: field 'output' must be a string"),
        ("{not json", "bad.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "bad.jsonl:2: messages[0].role: 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"question": "x"}', "cannot tell the format (fields: question)"),
    ],
)
def test_bad_rows_are_located(tmp_path: Path, line: str, needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "ok", "output": "ok"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert needle in str(e.value)
