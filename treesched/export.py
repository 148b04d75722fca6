"""Schedule exports: JSON (round-trips), Graphviz DOT, networkx on request."""

from __future__ import annotations

import json

import numpy as np

from .errors import TreeschedError
from .schedule import Schedule

JSON_FORMAT = "treesched-schedule"
JSON_VERSION = 1


def schedule_to_json(schedule: Schedule, indent=None) -> str:
    """Serialize the whole DAG; ``Schedule.from_json`` restores it exactly."""
    merges = slice(schedule.length, None)
    document = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "length": schedule.length,
        "pattern": schedule.pattern,
        "outputs": schedule.outputs,
        "merges": schedule.num_merges,
        "depth": schedule.depth,
        "widest_level": schedule.widest,
        # Per merge node (ids length, length+1, …): operands, level, span.
        "left": schedule.left[merges].tolist(),
        "right": schedule.right[merges].tolist(),
        "level": schedule.level[merges].tolist(),
        "start": schedule.start[merges].tolist(),
        "stop": schedule.stop[merges].tolist(),
        "output_positions": schedule.output_positions.tolist(),
        "output_nodes": schedule.output_nodes.tolist(),
    }
    return json.dumps(document, indent=indent)


def schedule_from_json(text: str) -> Schedule:
    """Parse and validate a document written by :func:`schedule_to_json`."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, TypeError) as error:
        raise TreeschedError(f"not a schedule JSON document: {error}") from None
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise TreeschedError(f"not a schedule JSON document (format != {JSON_FORMAT!r})")
    if document.get("version") != JSON_VERSION:
        raise TreeschedError(f"unsupported schedule JSON version {document.get('version')!r}")
    try:
        length = int(document["length"])
        count = len(document["left"])
        arrays = {name: np.asarray(document[name], np.int64).reshape(count)
                  for name in ("left", "right", "level", "start", "stop")}
        positions = np.asarray(document["output_positions"], np.int64).reshape(-1)
        nodes = np.asarray(document["output_nodes"], np.int64).reshape(-1)
        pattern, outputs = document["pattern"], document["outputs"]
    except (KeyError, ValueError, TypeError) as error:
        raise TreeschedError(f"malformed schedule JSON: {error!r}") from None
    if length < 1:
        raise TreeschedError("malformed schedule JSON: length must be positive")
    leaves = np.arange(length)
    schedule = Schedule(
        length=length, pattern=pattern, outputs=outputs,
        left=np.concatenate([np.full(length, -1), arrays["left"]]),
        right=np.concatenate([np.full(length, -1), arrays["right"]]),
        level=np.concatenate([np.zeros(length, np.int64), arrays["level"]]),
        start=np.concatenate([leaves, arrays["start"]]),
        stop=np.concatenate([leaves + 1, arrays["stop"]]),
        output_positions=positions, output_nodes=nodes,
    )
    if np.any(nodes < 0) or np.any(nodes >= schedule.num_nodes):
        raise TreeschedError("invalid schedule: output node out of range")
    return schedule.validate()


def _label(schedule: Schedule, node: int) -> str:
    start, stop = int(schedule.start[node]), int(schedule.stop[node])
    return f"x{start}" if node < schedule.length else f"{start}..{stop - 1}"


def schedule_to_dot(schedule: Schedule) -> str:
    """Graphviz DOT: one rank per level, edges operand → merge (l/r labelled)."""
    lines = [
        "digraph schedule {",
        f'  label="{schedule.pattern}, T={schedule.length}, '
        f'{schedule.num_merges} merges, depth {schedule.depth}";',
        "  rankdir=BT; node [shape=box, fontsize=10];",
    ]
    answered = {int(n): int(p) for p, n in
                zip(schedule.output_positions, schedule.output_nodes)}
    for lvl in range(schedule.depth + 1):
        first, last = schedule.level_offsets[lvl], schedule.level_offsets[lvl + 1]
        members = " ".join(f"n{node};" for node in range(first, last))
        lines.append(f"  {{ rank=same; {members} }}")
    for node in range(schedule.num_nodes):
        style = ", style=bold" if node in answered else ""
        lines.append(f'  n{node} [label="{_label(schedule, node)}"{style}];')
    for node in range(schedule.length, schedule.num_nodes):
        lines.append(f'  n{schedule.left[node]} -> n{node} [label="l"];')
        lines.append(f'  n{schedule.right[node]} -> n{node} [label="r"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def schedule_to_networkx(schedule: Schedule):
    """A ``networkx.DiGraph``: edges operand → merge with ``side`` 'left'/'right'.

    Built only on request; the compile path never touches networkx.
    """
    import networkx as nx

    graph = nx.DiGraph(length=schedule.length, pattern=schedule.pattern,
                       outputs=schedule.outputs, depth=schedule.depth)
    answered = {int(n): int(p) for p, n in
                zip(schedule.output_positions, schedule.output_nodes)}
    for node in range(schedule.num_nodes):
        graph.add_node(node, level=int(schedule.level[node]),
                       span=(int(schedule.start[node]), int(schedule.stop[node])),
                       leaf=node < schedule.length, answers=answered.get(node))
    merges = range(schedule.length, schedule.num_nodes)
    graph.add_edges_from((int(schedule.left[m]), m, {"side": "left"}) for m in merges)
    graph.add_edges_from((int(schedule.right[m]), m, {"side": "right"}) for m in merges)
    return graph
