// The states view: filters, the graph of flows, one page of states, paging, live updates.

import { get, live, ApiError } from "./api.js";
import { h, fill, ago, when, badges, chips } from "./dom.js";
import { drawGraph } from "./graph.js";

export const STATUSES = ["running", "parked", "ended", "delayed", "recovering", "forced"];
const LIMIT = 50;

/** The filter of a route's params: {view, labels: [groups], flow: [..], status: [..], before}. */
export function filterOf(params) {
  return {
    view: params.get("view") === "all" ? "all" : "latest",
    labels: params.getAll("labels").filter(Boolean),
    flow: params.getAll("flow").filter(Boolean),
    status: params.getAll("status").filter(Boolean),
    system: params.get("system") === "1" ? "1" : "",
    before: params.get("before") || "",
  };
}

/** The hash route of a filter. */
export function routeOf(filter) {
  const p = new URLSearchParams();
  if (filter.view === "all") p.set("view", "all");
  for (const l of filter.labels) p.append("labels", l);
  for (const f of filter.flow) p.append("flow", f);
  for (const s of filter.status) p.append("status", s);
  if (filter.system) p.set("system", "1");
  if (filter.before) p.set("before", filter.before);
  const text = p.toString();
  return `#/states${text ? `?${text}` : ""}`;
}

function apiParams(filter) {
  return { view: filter.view, labels: filter.labels, flow: filter.flow, status: filter.status, system: filter.system };
}

/** "a=1,b=2 | c=3" -> ["a=1,b=2", "c=3"] */
export function parseLabelInput(text) {
  return text.split("|").map((g) => g.split(",").map((p) => p.trim()).filter(Boolean).join(",")).filter(Boolean);
}

export class StatesView {
  constructor(root, app) {
    this.root = root;
    this.app = app;
    this.stopLive = null;
    this.cursors = []; // the `before` of the pages above this one
  }

  destroy() {
    if (this.stopLive) this.stopLive();
    this.stopLive = null;
    clearInterval(this.ticker);
    clearTimeout(this.graphTimer);
  }

  async show(params) {
    this.destroy();
    const filter = filterOf(params);
    this.filter = filter;
    this.rows = [];
    fill(this.root, this.renderFilters(filter), this.graphPanel = h("details", { class: "panel graph-panel", open: this.app.graphOpen !== false, ontoggle: (e) => { this.app.graphOpen = e.target.open; } },
      h("summary", {}, "Flows"), this.graphBox = h("div", { class: "graph-box", id: "graph" }, h("span", { class: "muted" }, "loading…")),
      this.graphNote = h("p", { class: "note" })),
    this.listHead = h("div", { class: "list-head" }),
    h("div", { class: "table-wrap" }, h("table", { class: "states", id: "states-table" },
      h("thead", {}, h("tr", {}, ["State", "Rev", "Flow", "Status", "Labels", "Committed"].map((c) => h("th", {}, c)))),
      this.tbody = h("tbody", {}))),
    this.pager = h("nav", { class: "pager" }));
    this.ticker = setInterval(() => this.refreshTimes(), 15000);
    await Promise.all([this.loadPage(filter), this.loadGraph(filter)]);
  }

  renderFilters(filter) {
    const labelInput = h("input", { name: "labels", id: "f-labels", value: filter.labels.join(" | "), placeholder: "app=demo,env=prod | app=other", size: 36, autocomplete: "off" });
    const flowInput = h("input", { name: "flow", id: "f-flow", value: filter.flow.join(","), placeholder: "any flow", list: "flow-ids", size: 18, autocomplete: "off" });
    this.flowList = h("datalist", { id: "flow-ids" });
    const viewBox = h("div", { class: "segmented", role: "radiogroup", "aria-label": "versions" },
      ["latest", "all"].map((v) => h("label", {},
        h("input", { type: "radio", name: "view", value: v, checked: filter.view === v }),
        h("span", {}, v === "latest" ? "Latest" : "All revisions"))));
    const statusBox = h("div", { class: "statuses", role: "group", "aria-label": "status" },
      STATUSES.map((s) => h("label", { class: `toggle s-${s}` },
        h("input", { type: "checkbox", name: "status", value: s, checked: filter.status.includes(s) }), h("span", {}, s))));
    this.error = h("p", { class: "error", hidden: true, id: "filter-error" });
    const form = h("form", { class: "panel filters", id: "filters", onsubmit: (e) => {
      e.preventDefault();
      const data = new FormData(form);
      this.app.go(routeOf({
        view: data.get("view") || "latest",
        labels: parseLabelInput(String(data.get("labels") || "")),
        flow: String(data.get("flow") || "").split(",").map((f) => f.trim()).filter(Boolean),
        status: data.getAll("status").map(String),
        system: filter.system,
        before: "",
      }));
    } },
    h("div", { class: "row" },
      viewBox,
      h("label", { class: "field" }, h("span", {}, "Labels"), labelInput),
      h("label", { class: "field" }, h("span", {}, "Flow"), flowInput, this.flowList)),
    h("div", { class: "row" }, statusBox,
      h("span", { class: "spacer" }),
      h("button", { type: "submit", class: "primary", id: "apply" }, "Apply"),
      h("button", { type: "button", onclick: () => this.app.go("#/states") }, "Clear")),
    this.error);
    form.addEventListener("change", (e) => {
      if (e.target.name === "view" || e.target.name === "status") form.requestSubmit();
    });
    return form;
  }

  async loadPage(filter) {
    let page;
    try {
      page = await get("states", { ...apiParams(filter), before: filter.before, limit: LIMIT });
    } catch (err) {
      this.showError(err);
      return;
    }
    this.head = page.head_rev;
    this.app.setHead(page.head_rev);
    this.rows = page.states;
    this.renderRows();
    this.renderPager(filter, page);
    if (!filter.before) {
      this.stopLive = live(apiParams(filter), page.head_rev, (row) => this.onLive(row), (s) => this.app.setLive(s));
    } else {
      this.app.setLive("paused");
    }
  }

  async loadGraph(filter) {
    try {
      const graph = await get("graph", apiParams(filter));
      const selected = new Set(filter.flow);
      if (filter.status.length === 1 && (filter.status[0] === "parked" || filter.status[0] === "ended")) selected.add(`(${filter.status[0]})`);
      fill(this.graphBox, drawGraph(graph, selected, (node) => this.pick(node)));
      fill(this.graphNote, `${graph.states} state(s), ${graph.versions} version(s)` +
        (graph.complete ? "" : " — drawn from the newest versions only") + ". Click a flow to filter by it.");
      fill(this.flowList, graph.nodes.filter((n) => n.kind === "flow").map((n) => h("option", { value: n.id })));
    } catch (err) {
      fill(this.graphBox, h("span", { class: "error" }, err.message));
    }
  }

  pick(node) {
    const f = { ...this.filter, before: "" };
    if (node.kind === "flow") {
      f.flow = f.flow.length === 1 && f.flow[0] === node.id ? [] : [node.id];
    } else {
      const s = node.kind;
      f.status = f.status.length === 1 && f.status[0] === s ? [] : [s];
      f.flow = [];
    }
    this.app.go(routeOf(f));
  }

  showError(err) {
    this.error.hidden = false;
    fill(this.error, err instanceof ApiError ? err.message : `error: ${err.message}`);
    fill(this.tbody);
  }

  rowEl(s, flash) {
    const href = `#/state?id=${encodeURIComponent(s.id)}`;
    return h("tr", { class: flash ? "flash" : "", dataset: { id: s.id, rev: String(s.rev) } },
      h("td", { class: "id" }, h("a", { href }, s.id)),
      h("td", { class: "num" }, s.rev),
      h("td", {}, s.to ? h("code", {}, s.to) : h("span", { class: "muted" }, "—")),
      h("td", {}, badges(s.statuses), s.attempt ? h("span", { class: "muted small" }, ` attempt ${s.attempt}`) : null),
      h("td", {}, chips(s.labels)),
      h("td", { class: "time", title: when(s.committed_at), dataset: { at: s.committed_at || "" } }, ago(s.committed_at)));
  }

  renderRows() {
    if (!this.rows.length) {
      fill(this.tbody, h("tr", {}, h("td", { colspan: 6, class: "muted empty" }, "No states match.")));
    } else {
      fill(this.tbody, this.rows.map((s) => this.rowEl(s, false)));
    }
    this.renderHead();
  }

  renderHead() {
    const f = this.filter;
    const what = f.view === "all" ? "revision(s)" : "state(s)";
    fill(this.listHead, `${this.rows.length} ${what} on this page`, f.before ? ` (older than rev ${f.before})` : " (newest first)");
  }

  renderPager(filter, page) {
    const buttons = [];
    if (filter.before) {
      buttons.push(h("button", { onclick: () => this.app.go(routeOf({ ...filter, before: "" })) }, "« Newest"));
      buttons.push(h("button", { onclick: () => history.back() }, "‹ Newer"));
    }
    buttons.push(h("button", { id: "older", disabled: !page.before, onclick: () => this.app.go(routeOf({ ...filter, before: String(page.before) })) }, "Older ›"));
    fill(this.pager, buttons, h("span", { class: "muted small" }, ` ${page.scanned} version(s) examined`));
  }

  onLive(row) {
    this.app.setHead(Math.max(this.head || 0, row.rev));
    this.scheduleGraph();
    const index = this.rows.findIndex((r) => r.id === row.id);
    if (this.filter.view === "latest" && index >= 0) {
      this.rows.splice(index, 1);
      this.tbody.querySelector(`tr[data-id="${CSS.escape(row.id)}"]`)?.remove();
    }
    if (!row.match) {
      if (!this.rows.length) this.renderRows();
      else this.renderHead();
      return;
    }
    if (!this.rows.length) fill(this.tbody);
    this.rows.unshift(row);
    this.tbody.prepend(this.rowEl(row, true));
    while (this.rows.length > LIMIT) {
      this.rows.pop();
      this.tbody.lastElementChild?.remove();
    }
    this.renderHead();
  }

  scheduleGraph() {
    if (this.graphTimer) return;
    this.graphTimer = setTimeout(() => {
      this.graphTimer = null;
      this.loadGraph(this.filter);
    }, 3000);
  }

  refreshTimes() {
    for (const td of this.tbody.querySelectorAll("td.time")) td.textContent = ago(td.dataset.at);
  }
}
