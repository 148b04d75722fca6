"""The schedule compiler against SPEC.md §2, checked independently."""

import json
import math

import numpy as np
import pytest

import treesched
from treesched import TreeschedError
from treesched.lowering import activation_memory, inference_slots, last_use_level

PATTERNS = list(treesched.PATTERN_NAMES)
STABLE = ["odd-even", "sequential", "sklansky", "kogge-stone"]


def compile_default(length, pattern):
    return treesched.compile(length, pattern, "last" if pattern == "reduce" else "all")


# ---------------------------------------------------------------- references
class HashCons:
    """Independent node store: a merge is identified by its operand pair."""

    def __init__(self, length):
        self.ids = {}
        self.length = length

    def merge(self, left, right):
        return self.ids.setdefault((left, right), self.length + len(self.ids))


def reference_odd_even(length):
    """SPEC.md §2 written as plainly as possible, on Python lists."""
    store = HashCons(length)

    def scan(elems):
        n = len(elems)
        if n < 2:
            return list(elems)
        reduced = [store.merge(elems[2 * k], elems[2 * k + 1]) for k in range(n // 2)]
        prefix = scan(reduced)
        out = [None] * n
        out[0] = elems[0]
        for k in range(len(prefix)):
            out[2 * k + 1] = prefix[k]
        for k in range(1, (n + 1) // 2):
            out[2 * k] = store.merge(prefix[k - 1], elems[2 * k])
        return out

    return store, scan(list(range(length)))


def structural_map(schedule, store):
    """Map each schedule node to the reference store's id for the same tree."""
    mapped = list(range(schedule.length))
    for node in range(schedule.length, schedule.num_nodes):
        key = (mapped[schedule.left[node]], mapped[schedule.right[node]])
        assert key in store.ids, f"merge {node} {key} is not in the reference"
        mapped.append(store.ids[key])
    return mapped


def ancestors(schedule, nodes):
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node >= schedule.length:
            stack += [int(schedule.left[node]), int(schedule.right[node])]
    return seen


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("pattern", PATTERNS)
def test_spans_levels_and_answers_for_every_length(pattern):
    for length in range(1, 301):
        s = compile_default(length, pattern)
        left, right, level = s.left.tolist(), s.right.tolist(), s.level.tolist()
        start, stop = s.start.tolist(), s.stop.tolist()
        for t in range(length):
            assert (left[t], right[t], level[t], start[t], stop[t]) == (-1, -1, 0, t, t + 1)
        for node in range(length, s.num_nodes):
            l, r = left[node], right[node]
            assert stop[l] == start[r], "operand spans must be adjacent"
            assert (start[node], stop[node]) == (start[l], stop[r])
            assert level[node] == max(level[l], level[r]) + 1
        expected = range(length) if pattern != "reduce" else [length - 1]
        assert s.output_positions.tolist() == list(expected)
        for position, node in zip(s.output_positions, s.output_nodes):
            assert (start[node], stop[node]) == (0, position + 1)
        # level arrays: each level's out is its contiguous id range
        for step in s.levels:
            assert np.all(s.level[step.out] == step.index)
            assert np.array_equal(s.left[step.out], step.left)
            assert step.left.dtype == np.int32 and step.out.dtype == np.int32
        assert sum(step.width for step in s.levels) == s.num_merges


def test_odd_even_matches_plain_recursion_node_for_node():
    for length in list(range(1, 130)) + [255, 256, 300, 500, 512]:
        schedule = treesched.compile(length)
        store, answers = reference_odd_even(length)
        mapped = structural_map(schedule, store)
        assert schedule.num_merges == len(store.ids)
        assert len(set(mapped[length:])) == schedule.num_merges  # a bijection
        assert [mapped[n] for n in schedule.output_nodes] == answers


@pytest.mark.parametrize("length,merges,depth", [(512, 1013, 16), (500, 985, None), (41, 73, None)])
def test_odd_even_published_counts(length, merges, depth):
    s = treesched.compile(length)
    assert s.num_merges == merges
    if depth is not None:
        assert s.depth == depth


def test_formulas_for_powers_of_two():
    for j in range(0, 11):
        n = 2 ** j
        odd_even = treesched.compile(n)
        assert odd_even.num_merges == 2 * n - 2 - j
        if n >= 4:
            assert odd_even.depth == 2 * j - 2
        assert treesched.compile(n, "sklansky").num_merges == n // 2 * j
        assert treesched.compile(n, "kogge-stone").num_merges == n * j - n + 1
    for n in range(1, 200):
        log = math.ceil(math.log2(n)) if n > 1 else 0
        for pattern in ("sklansky", "kogge-stone"):
            assert treesched.compile(n, pattern).depth == log
        assert treesched.compile(n, "reduce", "last").depth == log
        assert treesched.compile(n, "reduce", "last").num_merges == n - 1
        assert treesched.compile(n, "sequential").depth == n - 1


@pytest.mark.parametrize("pattern", STABLE)
def test_prefix_stability(pattern):
    base = {}
    for length in range(1, 100):
        s = treesched.compile(length, pattern)
        for t in range(length):
            tree = s.tree(s.answer(t))
            assert base.setdefault(t, tree) == tree, f"tree of {t} changed at length {length}"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("length", [1, 2, 5, 17, 40, 64, 100])
def test_pruning_keeps_exactly_the_ancestors(pattern, length):
    full = treesched.compile(length, pattern, "last" if pattern == "reduce" else "all")
    requests = ["last"] + ([1, 3, length] if pattern != "reduce" else [1])
    for outputs in requests:
        if isinstance(outputs, int) and outputs > length:
            continue
        pruned = treesched.compile(length, pattern, outputs)
        positions = pruned.output_positions.tolist()
        wanted = [full.answer(p) for p in positions]
        keep = ancestors(full, wanted)
        assert pruned.num_nodes == len(keep)
        full_trees = {full.tree(n) for n in keep if n >= length}
        pruned_trees = {pruned.tree(n) for n in range(length, pruned.num_nodes)}
        assert pruned_trees == full_trees
        for p in positions:
            assert pruned.tree(pruned.answer(p)) == full.tree(full.answer(p))


def test_outputs_requests_and_cache():
    s = treesched.compile(10, outputs=3)
    assert s.output_positions.tolist() == [7, 8, 9]
    assert treesched.compile(10, outputs="last").output_positions.tolist() == [9]
    assert treesched.compile(10) is treesched.compile(10, "odd-even", "all")


def test_schedule_is_immutable():
    s = treesched.compile(8)
    with pytest.raises(AttributeError):
        s.length = 3
    with pytest.raises(ValueError):
        s.left[0] = 5


@pytest.mark.parametrize("bad", [0, -3, 2.5, "x", None, True])
def test_bad_lengths(bad):
    with pytest.raises(TreeschedError, match="length"):
        treesched.compile(bad)


def test_bad_pattern_and_outputs():
    with pytest.raises(TreeschedError, match="unknown pattern 'foo'"):
        treesched.compile(8, "foo")
    with pytest.raises(TreeschedError, match="more positions than the length"):
        treesched.compile(8, outputs=9)
    for bad in (0, -1, "some", 1.5):
        with pytest.raises(TreeschedError, match="outputs"):
            treesched.compile(8, outputs=bad)
    with pytest.raises(TreeschedError, match="only the last position"):
        treesched.compile(8, "reduce", "all")


# --------------------------------------------------------------- statistics
def test_stats_and_memory():
    s = treesched.compile(512)
    info = s.stats()
    assert info["merges"] == 1013 and info["depth"] == 16
    assert info["widest_level"] == max(info["level_widths"]) == 256
    assert sum(info["level_widths"]) == 1013
    small, large = activation_memory(s, 4, 8), activation_memory(s, 8, 8)
    assert large["forward_backward_bytes"] == 2 * small["forward_backward_bytes"]
    assert small["forward_bytes"] < small["forward_backward_bytes"]
    assert activation_memory(s, 4, 8, "float64")["forward_bytes"] == 2 * small["forward_bytes"]
    with pytest.raises(TreeschedError):
        activation_memory(s, 0, 8)
    with pytest.raises(TreeschedError):
        activation_memory(s, 4, 8, "int8")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_inference_slots_never_alias_live_nodes(pattern):
    for length in (1, 2, 7, 33, 100):
        s = compile_default(length, pattern)
        plan = inference_slots(s)
        last = last_use_level(s)
        last = np.where(last < 0, s.level, last)
        owner = {}
        for level in range(s.depth + 1):
            # slots of nodes born at `level` must not belong to a node still live
            for node in range(s.level_offsets[level], s.level_offsets[level + 1]):
                slot = int(plan.slot[node])
                previous = owner.get(slot)
                assert previous is None or last[previous] < level
                owner[slot] = node
        assert plan.num_slots <= s.num_nodes


# ------------------------------------------------------------------ exports
@pytest.mark.parametrize("pattern", PATTERNS)
def test_json_round_trip(pattern):
    s = compile_default(37, pattern)
    again = treesched.Schedule.from_json(s.to_json())
    assert again == s and again.depth == s.depth
    document = json.loads(s.to_json())
    assert document["merges"] == s.num_merges


def test_json_rejects_tampering():
    document = json.loads(treesched.compile(9).to_json())
    document["left"][3] = document["left"][3] + 1
    with pytest.raises(TreeschedError, match="invalid schedule"):
        treesched.Schedule.from_json(json.dumps(document))
    with pytest.raises(TreeschedError, match="not a schedule"):
        treesched.Schedule.from_json("{]")
    with pytest.raises(TreeschedError, match="not a schedule"):
        treesched.Schedule.from_json('{"format": "other"}')


def test_dot_and_networkx():
    s = treesched.compile(6)
    dot = s.to_dot()
    assert dot.startswith("digraph schedule") and dot.count("->") == 2 * s.num_merges
    graph = s.to_networkx()
    assert graph.number_of_nodes() == s.num_nodes
    assert graph.number_of_edges() == 2 * s.num_merges
    import networkx as nx
    assert nx.is_directed_acyclic_graph(graph)
    last = s.answer(5)
    assert graph.nodes[last]["span"] == (0, 6) and graph.nodes[last]["answers"] == 5


def test_compile_path_does_not_import_networkx():
    import subprocess
    import sys
    code = ("import sys, treesched; treesched.compile(1000); treesched.compile(77, 'sklansky');"
            "print('networkx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
