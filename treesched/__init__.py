"""treesched: compile sequence lengths into merge schedules and run
tree-structured recurrent models (the Parallel Recursive LSTM) on them.

The data path, top to bottom:

* :func:`compile` turns a length into a :class:`Schedule` (the IR);
* :mod:`treesched.lowering` turns a schedule into buffers and slots;
* :mod:`treesched.backends` run the levels (numpy, numba, cupy);
* :class:`PRLSTM` is the model API on top.
"""

from .compiler import compile  # noqa: A004  (the package's verb, like re.compile)
from .errors import TreeschedError
from .patterns import PATTERNS
from .schedule import Level, Schedule
from .model import PRLSTM
from . import tasks

__version__ = "0.1.0"

PATTERN_NAMES = tuple(PATTERNS)

__all__ = ["compile", "PRLSTM", "Schedule", "Level", "TreeschedError", "PATTERN_NAMES", "tasks",
           "__version__"]
