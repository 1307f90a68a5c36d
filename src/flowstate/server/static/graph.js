// The graph of flows as SVG: a layered drawing, left to right, of nodes (flows, parked,
// ended) and the transitions between them with their counts. Clicking a node calls onPick.

import { svg } from "./dom.js";

const W = 160;
const H = 44;
const GAP_X = 90;
const GAP_Y = 26;
const PAD = 24;

/** Layers by longest path over the graph without its back edges; parked/ended go last. */
function layout(nodes, edges) {
  const ids = nodes.map((n) => n.id);
  const out = new Map(ids.map((id) => [id, []]));
  const indeg = new Map(ids.map((id) => [id, 0]));
  for (const e of edges) {
    if (e.from === e.to) continue;
    out.get(e.from).push(e.to);
    indeg.set(e.to, indeg.get(e.to) + 1);
  }
  // Depth-first from the sources (then from anything left) to find the back edges.
  const back = new Set();
  const state = new Map();
  const visit = (id) => {
    state.set(id, 1);
    for (const next of out.get(id)) {
      if (state.get(next) === 1) back.add(`${id}\u0000${next}`);
      else if (!state.has(next)) visit(next);
    }
    state.set(id, 2);
  };
  const byVisits = [...nodes].sort((a, b) => b.visits - a.visits);
  for (const n of byVisits) if (indeg.get(n.id) === 0 && !state.has(n.id)) visit(n.id);
  for (const n of byVisits) if (!state.has(n.id)) visit(n.id);

  const layer = new Map(ids.map((id) => [id, 0]));
  const forward = edges.filter((e) => e.from !== e.to && !back.has(`${e.from}\u0000${e.to}`));
  for (let round = 0; round < ids.length; round++) {
    let moved = false;
    for (const e of forward) {
      if (layer.get(e.to) < layer.get(e.from) + 1) {
        layer.set(e.to, layer.get(e.from) + 1);
        moved = true;
      }
    }
    if (!moved) break;
  }
  const terminal = nodes.filter((n) => n.kind !== "flow").map((n) => n.id);
  const flowDepth = Math.max(0, ...nodes.filter((n) => n.kind === "flow").map((n) => layer.get(n.id)));
  for (const id of terminal) layer.set(id, Math.max(layer.get(id), flowDepth + 1));

  const columns = [];
  for (const n of nodes) {
    const l = layer.get(n.id);
    (columns[l] ||= []).push(n);
  }
  const pos = new Map();
  columns.forEach((column, l) => {
    if (!column) return;
    // Order a column by the mean row of its predecessors (one barycentre pass).
    const rank = (n) => {
      const ys = edges.filter((e) => e.to === n.id && pos.has(e.from)).map((e) => pos.get(e.from).row);
      return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Number.MAX_SAFE_INTEGER;
    };
    column.sort((a, b) => rank(a) - rank(b) || (a.kind === "flow" ? 0 : 1) - (b.kind === "flow" ? 0 : 1) || a.id.localeCompare(b.id));
    column.forEach((n, row) => pos.set(n.id, { layer: l, row }));
  });
  const tallest = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  for (const [id, p] of pos) {
    const count = columns[p.layer].length;
    const offset = ((tallest - count) * (H + GAP_Y)) / 2;
    p.x = PAD + p.layer * (W + GAP_X);
    p.y = PAD + 34 + offset + p.row * (H + GAP_Y);
    pos.set(id, p);
  }
  const width = PAD * 2 + columns.length * (W + GAP_X);
  const height = PAD * 2 + 34 + tallest * (H + GAP_Y) + 44;
  return { pos, back, width, height };
}

function shorten(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** Draw `graph` ({nodes, edges}) into an <svg>; `selected` ids are highlighted. */
export function drawGraph(graph, selected, onPick) {
  const { nodes, edges } = graph;
  if (!nodes.length) {
    return svg("svg", { class: "graph", width: 320, height: 60, role: "img" },
      svg("text", { x: 16, y: 34, class: "empty" }, "No states match."));
  }
  const { pos, back, width, height } = layout(nodes, edges);
  const bottom = Math.max(...[...pos.values()].map((p) => p.y)) + H;
  const most = Math.max(1, ...edges.map((e) => e.count));
  const thick = (c) => 1.2 + 4 * (Math.log(1 + c) / Math.log(1 + most));

  const edgeEls = [];
  const labelEls = [];
  edges.forEach((e, i) => {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    let d;
    let lx;
    let ly;
    if (e.from === e.to) {
      const x = a.x + W / 2;
      d = `M ${x - 18} ${a.y} C ${x - 30} ${a.y - 34}, ${x + 30} ${a.y - 34}, ${x + 18} ${a.y}`;
      lx = x;
      ly = a.y - 30;
    } else if (a.layer + 1 < b.layer && !back.has(`${e.from}\u0000${e.to}`)) {
      // Skips a column: up through the gap, along the lane above every node, down the gap.
      const lane = PAD + 6 + (i % 3) * 8;
      const y1 = a.y + H * 0.3;
      const y2 = b.y + H * 0.3;
      const g1 = a.x + W + GAP_X * 0.35;
      const g2 = b.x - GAP_X * 0.35;
      d = `M ${a.x + W} ${y1} Q ${g1} ${y1}, ${g1} ${y1 - 12} L ${g1} ${lane + 10} Q ${g1} ${lane}, ${g1 + 10} ${lane}` +
        ` L ${g2 - 10} ${lane} Q ${g2} ${lane}, ${g2} ${lane + 10} L ${g2} ${y2 - 12} Q ${g2} ${y2}, ${b.x - 2} ${y2}`;
      lx = (g1 + g2) / 2;
      ly = lane;
    } else if (back.has(`${e.from}\u0000${e.to}`) || b.x <= a.x) {
      // Goes back: down through the gap, along the lane below every node, up the gap.
      const lane = bottom + 18 + (i % 3) * 8;
      const y1 = a.y + H * 0.7;
      const y2 = b.y + H * 0.7;
      const g1 = a.x + W + GAP_X * 0.35;
      const g2 = b.x - GAP_X * 0.35;
      d = `M ${a.x + W} ${y1} Q ${g1} ${y1}, ${g1} ${y1 + 12} L ${g1} ${lane - 10} Q ${g1} ${lane}, ${g1 - 10} ${lane}` +
        ` L ${g2 + 10} ${lane} Q ${g2} ${lane}, ${g2} ${lane - 10} L ${g2} ${y2 + 12} Q ${g2} ${y2}, ${b.x - 2} ${y2}`;
      lx = (g1 + g2) / 2;
      ly = lane;
    } else {
      const x1 = a.x + W;
      const y1 = a.y + H / 2;
      const x2 = b.x;
      const y2 = b.y + H / 2;
      const mid = (x1 + x2) / 2;
      d = `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2 - 2} ${y2}`;
      lx = mid;
      ly = (y1 + y2) / 2;
    }
    edgeEls.push(svg("path", { d, class: "edge", "stroke-width": thick(e.count).toFixed(2), "marker-end": "url(#arrow)" },
      svg("title", {}, `${e.from} → ${e.to}: ${e.count}`)));
    const text = String(e.count);
    labelEls.push(svg("g", { class: "edge-label" },
      svg("rect", { x: lx - 4 - text.length * 3.6, y: ly - 9, width: 8 + text.length * 7.2, height: 16, rx: 4 }),
      svg("text", { x: lx, y: ly + 3, "text-anchor": "middle" }, text)));
  });

  const nodeEls = nodes.map((n) => {
    const p = pos.get(n.id);
    const chosen = selected.has(n.id);
    return svg("g", {
      class: `node k-${n.kind}${chosen ? " selected" : ""}`,
      transform: `translate(${p.x} ${p.y})`,
      tabindex: 0,
      role: "button",
      "data-node": n.id,
      onclick: () => onPick(n),
      onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); onPick(n); } },
    },
    svg("title", {}, `${n.id}\n${n.now} state(s) here now, ${n.visits} version(s) visited\nclick to filter`),
    svg("rect", { width: W, height: H, rx: 8 }),
    svg("text", { x: W / 2, y: 18, "text-anchor": "middle", class: "name" }, shorten(n.id, 22)),
    svg("text", { x: W / 2, y: 34, "text-anchor": "middle", class: "count" }, `${n.now} now · ${n.visits} seen`));
  });

  return svg("svg", { class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "graph of flows" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
      svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))),
    svg("g", {}, edgeEls), svg("g", {}, nodeEls), svg("g", {}, labelEls));
}
