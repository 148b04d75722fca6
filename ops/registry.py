"""Cell registry: name -> Cell class.

Adding a cell = one new module defining a ``Cell`` subclass, plus one
``register_cell`` line below (or a call from user code).
"""

from ..errors import TreeschedError
from .cell import Cell
from .lstm import LSTMCell
from .rnn import RNNCell

_CELLS = {}


def register_cell(cls):
    """Register a ``Cell`` subclass under ``cls.name``; returns cls (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Cell)) or not cls.name:
        raise TreeschedError(f"register_cell needs a Cell subclass with a name, got {cls!r}")
    _CELLS[cls.name.lower()] = cls
    return cls


def unregister_cell(name):
    """Remove the cell registered as ``name`` (case-insensitive); no error if absent."""
    _CELLS.pop(str(name).lower(), None)


def cell_names():
    """The registered cell names, sorted."""
    return tuple(sorted(_CELLS))


def get_cell(name, num_layers=2):
    """A new cell instance: ``get_cell("lstm", 2)``. Names are case-insensitive."""
    cls = _CELLS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise TreeschedError(f"unknown cell {name!r}; known cells: {', '.join(cell_names())}")
    return cls(num_layers)


register_cell(LSTMCell)
register_cell(RNNCell)
