"""Built-in synthetic benchmarks: `facts` (QA), `wiki-topic` (demos), `persona` (conversations).

Each generator is deterministic from (split, size, seed); `genadapter make-benchmarks` writes
the default files into `data/benchmarks/`.
"""

from .facts import make_facts
from .persona import make_persona
from .wiki_topic import make_wiki_topic

__all__ = ["make_facts", "make_persona", "make_wiki_topic"]
