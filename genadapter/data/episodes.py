"""Evaluation episodes: a context stream to read, then questions about it.

Three kinds share one contract so the harness can treat them alike:
`context_texts()` is the stream of documents a method reads (into a state, a prompt, or a
fine-tuning run), and the questions/queries are scored afterwards.

File format is JSONL, one episode per line. Loading is forgiving: a bad line is reported as
"line N: reason" and skipped, so one corrupt record never sinks a whole evaluation run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EpisodeError(ValueError):
    """An episode record is missing a field, has the wrong type, or cannot be scored."""


# ----------------------------------------------------------------------------- validation


def _get(d: Any, key: str, typ: type, where: str) -> Any:
    if not isinstance(d, dict):
        raise EpisodeError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise EpisodeError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise EpisodeError(
            f"{where}: field {key!r} must be {typ.__name__}, got {type(value).__name__}"
        )
    return value


def _str(d: Any, key: str, where: str, allow_empty: bool = False) -> str:
    value = _get(d, key, str, where)
    if not allow_empty and not value.strip():
        raise EpisodeError(f"{where}: field {key!r} is empty")
    return value


def _str_list(d: Any, key: str, where: str) -> list[str]:
    """A non-empty list of strings, at least one of them non-blank."""
    values = _get(d, key, list, where)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise EpisodeError(f"{where}: {key}[{i}] must be str, got {type(v).__name__}")
    if not any(v.strip() for v in values):
        raise EpisodeError(f"{where}: field {key!r} is empty")
    return list(values)


def _list(d: Any, key: str, where: str) -> list:
    values = _get(d, key, list, where)
    if not values:
        raise EpisodeError(f"{where}: field {key!r} is empty")
    return values


# ----------------------------------------------------------------------------- episode kinds


class Cloze(str):
    """A question its answer continues, as text. Small instruct LMs recall a value from their
    context by continuing text (an induction copy) far better than by answering a chat question
    about it: SmolLM2-135M-Instruct picks the right one of 2 / 4 / 8 values 73 / 76 / 56 % of the
    time as "key: value" lines + "key:", 50 / 27 / 18 % asked in a chat turn
    (experiments/recall/README.md)."""


@dataclass
class QA:
    question: str  # a `Cloze` (JSON: "cloze": true) when the answer continues it as text
    answers: list[str]  # any of these counts as correct
    # optional closed set of candidate answers of the same type, answers[0] among them: ranking
    # them by likelihood tells whether the right *value* got in, beyond the right kind of answer
    options: list[str] | None = None

    def to_json(self) -> dict:
        d: dict[str, Any] = {"question": str(self.question), "answers": list(self.answers)}
        if isinstance(self.question, Cloze):
            d["cloze"] = True
        if self.options is not None:
            d["options"] = list(self.options)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "qa") -> QA:
        question = _str(d, "question", where)
        answers = _get(d, "answers", list, where)
        if not answers:
            raise EpisodeError(f"{where}: question {question!r} has no answers")
        for i, a in enumerate(answers):
            if not isinstance(a, str) or not a.strip():
                raise EpisodeError(f"{where}: answers[{i}] must be a non-empty string")
        options = None
        if isinstance(d, dict) and d.get("options") is not None:
            options = _str_list(d, "options", where)
            if answers[0] not in options or len(set(options)) < 2:
                raise EpisodeError(
                    f"{where}: options must hold answers[0] and at least one other candidate"
                )
        cloze = isinstance(d, dict) and d.get("cloze", False)
        if not isinstance(cloze, bool):
            raise EpisodeError(f"{where}: cloze must be true or false, got {cloze!r}")
        return cls(Cloze(question) if cloze else question, list(answers), options)


def _qas(d: Any) -> list[QA]:
    return [QA.from_json(q, f"qas[{i}]") for i, q in enumerate(_list(d, "qas", "episode"))]


@dataclass
class QAEpisode:
    """Knowledge injection: read documents, answer questions about them."""

    id: str
    context: list[str]
    qas: list[QA]

    def context_texts(self) -> list[str]:
        return list(self.context)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "context": list(self.context),
            "qas": [q.to_json() for q in self.qas],
        }

    @classmethod
    def from_json(cls, d: Any) -> QAEpisode:
        return cls(_str(d, "id", "episode"), _str_list(d, "context", "episode"), _qas(d))


@dataclass
class Demo:
    input: str
    output: str

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output}

    @classmethod
    def from_json(cls, d: Any, where: str = "demonstration") -> Demo:
        return cls(_str(d, "input", where), _str(d, "output", where))

    def render(self) -> str:
        return f"Input: {self.input}\nOutput: {self.output}"


@dataclass
class Query:
    input: str
    output: str
    options: list[str]  # closed label set; scoring ranks these, so `output` must be one of them

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output, "options": list(self.options)}

    @classmethod
    def from_json(cls, d: Any, where: str = "query") -> Query:
        inp, out = _str(d, "input", where), _str(d, "output", where)
        options = _str_list(d, "options", where)
        if out not in options:
            raise EpisodeError(f"{where}: output {out!r} is not among its options {options}")
        return cls(inp, out, options)


@dataclass
class DemoEpisode:
    """In-context learning: k labelled demonstrations, then queries with a closed label set."""

    id: str
    demonstrations: list[Demo]
    queries: list[Query]

    def context_texts(self) -> list[str]:
        return [d.render() for d in self.demonstrations]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "demonstrations": [d.to_json() for d in self.demonstrations],
            "queries": [q.to_json() for q in self.queries],
        }

    @classmethod
    def from_json(cls, d: Any) -> DemoEpisode:
        ep_id = _str(d, "id", "episode")
        demos = _list(d, "demonstrations", "episode")
        queries = _list(d, "queries", "episode")
        return cls(
            ep_id,
            [Demo.from_json(x, f"demonstrations[{i}]") for i, x in enumerate(demos)],
            [Query.from_json(x, f"queries[{i}]") for i, x in enumerate(queries)],
        )


@dataclass
class ConversationEpisode:
    """Personalisation: earlier chat sessions, then questions about what the user said."""

    id: str
    sessions: list[list[dict]]  # each turn: {"role": "user" | "assistant" | ..., "content": str}
    qas: list[QA]

    def context_texts(self) -> list[str]:
        return [
            "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in session)
            for session in self.sessions
        ]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "sessions": [[dict(t) for t in s] for s in self.sessions],
            "qas": [q.to_json() for q in self.qas],
        }

    @classmethod
    def from_json(cls, d: Any) -> ConversationEpisode:
        ep_id = _str(d, "id", "episode")
        sessions = _list(d, "sessions", "episode")
        for i, session in enumerate(sessions):
            if not isinstance(session, list) or not session:
                raise EpisodeError(f"sessions[{i}]: must be a non-empty list of turns")
            for j, turn in enumerate(session):
                where = f"sessions[{i}][{j}]"
                _str(turn, "role", where)
                _str(turn, "content", where, allow_empty=True)
        return cls(ep_id, [[dict(t) for t in s] for s in sessions], _qas(d))


Episode = QAEpisode | DemoEpisode | ConversationEpisode
TASK_KINDS: dict[str, type] = {
    "qa": QAEpisode,
    "demo": DemoEpisode,
    "conversation": ConversationEpisode,
}
# the key that tells each kind apart when a file does not say which kind it holds
_KIND_KEYS = {"demonstrations": "demo", "sessions": "conversation", "context": "qa"}


def infer_kind(d: dict) -> str:
    """The episode kind of a JSON record, from its distinctive key."""
    for key, kind in _KIND_KEYS.items():
        if key in d:
            return kind
    raise EpisodeError(
        f"cannot tell the episode kind: none of {list(_KIND_KEYS)} in keys {list(d)}"
    )


# ----------------------------------------------------------------------------- JSONL IO


def read_episodes(path: str | Path, kind: str | None = None) -> tuple[list[Episode], list[str]]:
    """Load a JSONL episode file, skipping bad lines instead of raising.

    Returns (episodes, problems); each problem is "line N: reason" (1-based). Blank lines are
    ignored; a repeated id is a problem too, since reports key results by id.
    `kind` forces one episode kind (a key of TASK_KINDS); None infers it per line.
    """
    if kind is not None and kind not in TASK_KINDS:
        raise ValueError(f"unknown episode kind {kind!r}; choose from {sorted(TASK_KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"episode file not found: {path}")
    episodes: list[Episode] = []
    problems: list[str] = []
    seen: set[str] = set()
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 byte-order mark
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"line {n}: invalid UTF-8 at byte {e.start}")
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            if not isinstance(d, dict):
                raise EpisodeError(f"expected a JSON object, got {type(d).__name__}")
            ep = TASK_KINDS[kind or infer_kind(d)].from_json(d)
        except EpisodeError as e:
            problems.append(f"line {n}: {e}")
            continue
        if ep.id in seen:
            problems.append(f"line {n}: duplicate episode id {ep.id!r}")
            continue
        seen.add(ep.id)
        episodes.append(ep)
    return episodes, problems


def write_episodes(path: str | Path, episodes: list[Episode]) -> None:
    """Write episodes as UTF-8 JSONL (one per line), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for ep in episodes:
            f.write(json.dumps(ep.to_json(), ensure_ascii=False) + "\n")
