"""Built-in synthetic benchmarks: `facts` (QA), `wiki-topic` (demos), `persona` (conversations),
`recall` (associative recall of key -> value pairs).

Each generator is deterministic from (split, size, seed); `genadapter make-benchmarks` writes
the default files into `data/benchmarks/`.
"""

from .facts import make_facts
from .persona import make_persona
from .recall import make_recall
from .wiki_topic import make_wiki_topic

__all__ = ["make_facts", "make_persona", "make_recall", "make_wiki_topic"]
