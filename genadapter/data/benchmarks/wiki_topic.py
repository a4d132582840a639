"""`wiki-topic`: classify a Wikipedia summary into one of 11 topics from k demonstrations.

The demonstrations are the context stream; a method that reads them well should beat the
zero-shot prior, and more demonstrations (k = 4 .. 64) should help. Articles split into
train/validation/test by a hash of their title, so the splits never share an article, and
within an episode demonstrations and queries are distinct articles.
"""

from __future__ import annotations

import re
from functools import cache

from genadapter.assets import load_wiki_summaries
from genadapter.data.episodes import Demo, DemoEpisode, Query

from .common import check_split, rng_for, split_of

# The 11 topic labels of the Vital Articles summaries ("Uncategorized" is dropped: no signal).
TOPICS = (
    "Arts",
    "Biology and health sciences",
    "Everyday life",
    "Geography",
    "History",
    "Mathematics",
    "People",
    "Philosophy and religion",
    "Physical sciences",
    "Society and social sciences",
    "Technology",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def article_input(row: dict, max_words: int = 48) -> str:
    """Title plus whole leading sentences of the extract within `max_words` (cut if the first is longer)."""
    words: list[str] = []
    for sentence in _SENTENCE_END.split(row["extract"].strip()):
        w = sentence.split()
        if words and len(words) + len(w) > max_words:
            break
        words += w
    text = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
    return f"{row['title']}: {text}"


@cache
def articles_by_topic(split: str) -> dict[str, tuple[dict, ...]]:
    """The split's articles grouped by topic (split by a hash of the title, fixed forever)."""
    check_split(split)
    rows = [
        r for r in load_wiki_summaries() if r["topic"] in TOPICS and split_of(r["title"]) == split
    ]
    return {t: tuple(r for r in rows if r["topic"] == t) for t in TOPICS}


def make_wiki_topic(
    split: str, n_episodes: int, k: int = 16, n_queries: int = 8, seed: int = 0, max_words: int = 48
) -> list[DemoEpisode]:
    """Generate episodes of k demonstrations and `n_queries` queries, all options = TOPICS.

    Demonstration labels cycle through a shuffled label order (each topic shows up k/11
    times, +-1) so no label is starved; query labels are uniform, so chance is 1/11.
    """
    by_topic = articles_by_topic(split)
    r = rng_for("wiki-topic", split, seed, k, n_queries)
    episodes = []
    for i in range(n_episodes):
        order = list(TOPICS)
        r.shuffle(order)
        labels = [order[j % len(order)] for j in range(k)] + [
            r.choice(TOPICS) for _ in range(n_queries)
        ]
        # draw every article of the episode without replacement, per topic
        drawn = {t: r.sample(by_topic[t], labels.count(t)) for t in sorted(set(labels))}
        rows = [drawn[t].pop() for t in labels]
        demos = [Demo(article_input(x, max_words), x["topic"]) for x in rows[:k]]
        r.shuffle(demos)
        queries = [Query(article_input(x, max_words), x["topic"], list(TOPICS)) for x in rows[k:]]
        episodes.append(DemoEpisode(f"wiki-topic-{split}-k{k}-s{seed}-{i:05d}", demos, queries))
    return episodes
