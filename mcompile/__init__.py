"""mcompile: dynamic sparse attention for long-context prefill, as a torch.compile backend.

    model = torch.compile(model, backend="minference")

See README.md. Importing the package registers the ``mcompile::`` ops; it does nothing else.
"""

from . import ops, serving
from .backend import minference_backend
from .config import Compiler, MInferenceConfig
from .explain import Explanation, explain
from .index import SparseIndex
from .patterns import Pattern, PatternKind

__version__ = "0.1.0"

__all__ = ["MInferenceConfig", "Compiler", "explain", "Explanation", "minference_backend", "ops", "Pattern",
           "PatternKind", "SparseIndex", "serving", "__version__"]
