"""Episode dataclasses and JSONL IO: round trips, and bad lines reported but never fatal."""

import json

import pytest

from genadapter.data.episodes import (
    QA,
    TASK_KINDS,
    Cloze,
    ConversationEpisode,
    Demo,
    DemoEpisode,
    EpisodeError,
    QAEpisode,
    Query,
    read_episodes,
    write_episodes,
)

LABELS = ["Arts", "History"]


def qa_ep(i: int = 0) -> QAEpisode:
    return QAEpisode(
        f"qa-{i}",
        ["Zorbil Quanto was born in Lyon.", "Café Émile — ünïcode ✓"],
        [
            QA("Where was Zorbil Quanto born?", ["Lyon"]),
            QA("Where is the café?", ["Paris"], options=["Rome", "Paris", "Lyon"]),
        ],
    )


def demo_ep(i: int = 0) -> DemoEpisode:
    return DemoEpisode(
        f"demo-{i}",
        [Demo("Mona Lisa", "Arts"), Demo("Battle of Hastings", "History")],
        [Query("Guernica", "Arts", LABELS)],
    )


def conv_ep(i: int = 0) -> ConversationEpisode:
    return ConversationEpisode(
        f"conv-{i}",
        [
            [
                {"role": "user", "content": "My dog is Biscuit."},
                {"role": "assistant", "content": "Cute!"},
            ],
            [{"role": "user", "content": "Hello again."}],
        ],
        [QA("What is my dog's name?", ["Biscuit"])],
    )


def test_round_trip_each_kind(tmp_path):
    eps = [qa_ep(), demo_ep(), conv_ep()]
    path = tmp_path / "nested" / "eps.jsonl"
    write_episodes(path, eps)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    got, problems = read_episodes(path)
    assert problems == []
    assert got == eps
    assert [type(e) for e in got] == [QAEpisode, DemoEpisode, ConversationEpisode]
    for kind, cls in TASK_KINDS.items():
        one = tmp_path / f"{kind}.jsonl"
        ep = next(e for e in eps if isinstance(e, cls))
        write_episodes(one, [ep])
        assert read_episodes(one, kind=kind) == ([ep], [])
        assert cls.from_json(json.loads(json.dumps(ep.to_json()))) == ep


def test_json_layout():
    assert qa_ep().to_json() == {
        "id": "qa-0",
        "context": qa_ep().context,
        "qas": [
            {"question": "Where was Zorbil Quanto born?", "answers": ["Lyon"]},
            {
                "question": "Where is the café?",
                "answers": ["Paris"],
                "options": ["Rome", "Paris", "Lyon"],
            },
        ],
    }
    assert demo_ep().to_json()["queries"] == [
        {"input": "Guernica", "output": "Arts", "options": LABELS}
    ]
    assert conv_ep().to_json()["sessions"][1] == [{"role": "user", "content": "Hello again."}]


def test_context_texts():
    assert qa_ep().context_texts() == qa_ep().context
    assert demo_ep().context_texts() == [
        "Input: Mona Lisa\nOutput: Arts",
        "Input: Battle of Hastings\nOutput: History",
    ]
    assert conv_ep().context_texts() == [
        "User: My dog is Biscuit.\nAssistant: Cute!",
        "User: Hello again.",
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"context": ["x"], "qas": [{"question": "q", "answers": ["a"]}]}, "missing field 'id'"),
        ({"id": "e", "context": [], "qas": [{"question": "q", "answers": ["a"]}]}, "empty"),
        ({"id": "e", "context": "text", "qas": [{"question": "q", "answers": ["a"]}]}, "list"),
        ({"id": "e", "context": ["x"], "qas": []}, "empty"),
        ({"id": "e", "context": ["x"], "qas": [{"question": "q", "answers": []}]}, "no answers"),
        ({"id": 3, "context": ["x"], "qas": [{"question": "q", "answers": ["a"]}]}, "must be str"),
        (
            {
                "id": "e",
                "context": ["x"],
                "qas": [{"question": "q", "answers": ["a"], "options": ["b", "c"]}],
            },
            "options must hold answers",
        ),
        (
            {
                "id": "e",
                "context": ["x"],
                "qas": [{"question": "q", "answers": ["a"], "options": ["a"]}],
            },
            "options must hold answers",
        ),
        (
            {
                "id": "e",
                "context": ["x"],
                "qas": [{"question": "q", "answers": ["a"], "options": "a"}],
            },
            "must be list",
        ),
        (
            {"id": "e", "context": ["x"], "qas": [{"question": "q", "answers": ["a"], "cloze": 1}]},
            "cloze must be true or false",
        ),
    ],
)
def test_qa_from_json_rejects(record, message):
    with pytest.raises(EpisodeError, match=message):
        QAEpisode.from_json(record)


def test_cloze_questions_round_trip():
    record = {"id": "e", "context": ["The code for zorba is 4711."], "qas": []}
    record["qas"] = [
        {"question": "The code for zorba is", "answers": ["4711"], "cloze": True},
        {"question": "What is the code for zorba?", "answers": ["4711"]},
    ]
    episode = QAEpisode.from_json(record)
    assert [type(qa.question) for qa in episode.qas] == [Cloze, str]
    assert episode.to_json() == record


def test_demo_and_conversation_reject():
    good = demo_ep().to_json()
    with pytest.raises(EpisodeError, match="not among its options"):
        DemoEpisode.from_json(
            {**good, "queries": [{"input": "x", "output": "Z", "options": LABELS}]}
        )
    with pytest.raises(EpisodeError, match="empty"):
        DemoEpisode.from_json({**good, "demonstrations": []})
    with pytest.raises(EpisodeError, match="empty"):
        DemoEpisode.from_json({**good, "queries": []})
    conv = conv_ep().to_json()
    with pytest.raises(EpisodeError, match="empty"):
        ConversationEpisode.from_json({**conv, "sessions": []})
    with pytest.raises(EpisodeError, match="role"):
        ConversationEpisode.from_json({**conv, "sessions": [[{"content": "hi"}]]})


def test_bad_lines_reported_and_skipped(tmp_path):
    good = [json.dumps(e.to_json(), ensure_ascii=False).encode() for e in (qa_ep(1), demo_ep(2))]
    bad_query = demo_ep(3).to_json()
    bad_query["queries"][0]["output"] = "Science"
    lines = [
        good[0],  # 1
        b'{"id": "broken", "context": [',  # 2 invalid JSON
        b'{"id": "bytes", "context": ["caf\xe9"], "qas": []}',  # 3 invalid UTF-8
        json.dumps({"id": "nofield", "qas": [{"question": "q", "answers": ["a"]}]}).encode(),  # 4
        json.dumps(
            {"id": "e", "context": [], "qas": [{"question": "q", "answers": ["a"]}]}
        ).encode(),
        json.dumps(
            {"id": "n", "context": ["x"], "qas": [{"question": "q", "answers": []}]}
        ).encode(),
        json.dumps(bad_query).encode(),  # 7 output not in options
        b"",  # 8 blank: ignored
        good[1],  # 9
        good[0],  # 10 duplicate id
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    eps, problems = read_episodes(path)
    assert [e.id for e in eps] == ["qa-1", "demo-2"]
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 10)]
    reasons = dict(p.split(": ", 1) for p in problems)
    assert "invalid JSON" in reasons["line 2"]
    assert "UTF-8" in reasons["line 3"]
    assert "cannot tell" in reasons["line 4"]  # no context key: kind unknown
    assert "empty" in reasons["line 5"]
    assert "no answers" in reasons["line 6"]
    assert "not among its options" in reasons["line 7"]
    assert "duplicate" in reasons["line 10"]
    # forcing the kind turns an unknowable record into a precise missing-field report
    _, forced = read_episodes(path, kind="qa")
    assert "line 4: episode: missing field 'context'" in forced


def test_missing_file_and_unknown_kind(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_episodes(missing)
    missing.write_text("")
    assert read_episodes(missing) == ([], [])
    with pytest.raises(ValueError, match="unknown episode kind"):
        read_episodes(missing, kind="video")
