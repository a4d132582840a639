"""genadapter: generative adapters for frozen causal LMs (see DESIGN.md)."""

from .config import GeneratorConfig
from .model import GenerativeAdapter
from .state import AdapterState, StateMismatchError

__all__ = ["AdapterState", "GenerativeAdapter", "GeneratorConfig", "StateMismatchError"]
__version__ = "0.1.0"
