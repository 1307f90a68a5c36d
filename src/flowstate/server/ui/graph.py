"""The graph of flows: nodes are where versions go (``transition.to``, or parked / ended),
edges join consecutive versions of one state, with counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from flowstate.engine import Engine
from flowstate.server.ui.query import Filter, scan
from flowstate.state import State, ended

#: The graph is drawn from at most this many of the newest versions.
GRAPH_WINDOW = 20_000
PARKED = "(parked)"
ENDED = "(ended)"


def node_of(state: State) -> str:
    """The node a version sits at: its flow, or :data:`PARKED` / :data:`ENDED`."""
    if state.transition.to:
        return state.transition.to
    return ENDED if ended(state) else PARKED


@dataclass(slots=True)
class Graph:
    """``now``: states whose latest version is at a node; ``visits``: versions at a node;
    ``edges``: (from, to) -> how many times a state went that way. ``complete``: the whole
    log was read (else only the newest :data:`GRAPH_WINDOW` versions)."""

    now: Counter[str] = field(default_factory=Counter)
    visits: Counter[str] = field(default_factory=Counter)
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    states: int = 0
    versions: int = 0
    complete: bool = True

    def as_json(self) -> dict[str, Any]:
        names = sorted(self.visits.keys() | self.now.keys())
        return {
            "nodes": [
                {
                    "id": n,
                    "now": self.now[n],
                    "visits": self.visits[n],
                    "kind": "flow" if n not in (PARKED, ENDED) else n.strip("()"),
                }
                for n in names
            ],
            "edges": [{"from": a, "to": b, "count": c} for (a, b), c in sorted(self.edges.items())],
            "states": self.states,
            "versions": self.versions,
            "complete": self.complete,
        }


def build(histories: dict[str, list[State]], include: Callable[[State], bool]) -> Graph:
    """The graph of the states whose last version passes ``include``; each history is in rev
    order."""
    graph = Graph()
    for versions in histories.values():
        if not versions or not include(versions[-1]):
            continue
        graph.states += 1
        graph.versions += len(versions)
        graph.now[node_of(versions[-1])] += 1
        previous: str | None = None
        for state in versions:
            node = node_of(state)
            graph.visits[node] += 1
            if previous is not None:
                graph.edges[previous, node] += 1
            previous = node
    return graph


async def flow_graph(
    engine: Engine, flt: Filter, pending: Collection[str], window: int = GRAPH_WINDOW
) -> Graph:
    """The graph of the states matching ``flt``, from the newest ``window`` versions."""
    head = await engine.driver.head_rev()
    lo = max(0, head - window)
    versions, _ = await scan(engine, flt.label_sets(), False, lo, head, lambda s: True)
    histories: dict[str, list[State]] = {}
    for state in versions:
        histories.setdefault(state.id, []).append(state)
    graph = build(histories, lambda s: flt.matches(s, pending))
    graph.complete = lo == 0
    return graph
