// The state detail: why it waits, the actions, the timeline of its revisions, the difference
// between two revisions, and its data.

import { get, post, live, download, ApiError } from "./api.js";
import { h, fill, ago, when, span, badges, chips, kvTable } from "./dom.js";

export class DetailView {
  constructor(root, app) {
    this.root = root;
    this.app = app;
    this.stopLive = null;
  }

  destroy() {
    if (this.stopLive) this.stopLive();
    this.stopLive = null;
    clearTimeout(this.reloadTimer);
  }

  async show(params) {
    this.destroy();
    this.id = params.get("id") || "";
    this.picked = [];
    fill(this.root, h("p", { class: "muted" }, "loading…"));
    await this.load();
  }

  async load(message) {
    let doc;
    try {
      doc = await get("state", { id: this.id });
    } catch (err) {
      fill(this.root, h("a", { href: this.app.statesRoute, class: "back" }, "← States"),
        h("p", { class: "error", id: "detail-error" }, err.message));
      return;
    }
    this.doc = doc;
    this.render(doc, message);
    if (!this.stopLive) {
      this.stopLive = live({ system: "1" }, doc.state.rev, (row) => {
        if (row.id !== this.id) return;
        clearTimeout(this.reloadTimer);
        this.reloadTimer = setTimeout(() => this.load(`New revision ${row.rev} committed.`), 250);
      }, (s) => this.app.setLive(s));
    }
  }

  render(doc, message) {
    const s = doc.state;
    this.diffBox = h("div", { class: "diff-box", id: "diff" });
    this.dataBox = h("div", { class: "data-box", id: "data-preview" });
    this.timeline = h("ol", { class: "timeline", id: "timeline" }, doc.revisions.map((r, i) => this.revisionEl(r, doc.revisions[i + 1])));
    fill(this.root,
      h("a", { href: this.app.statesRoute, class: "back" }, "← States"),
      h("header", { class: "detail-head" },
        h("h2", { id: "state-id" }, s.id),
        h("div", { class: "facts" }, badges(s.statuses),
          h("span", {}, "rev ", h("strong", { id: "state-rev" }, s.rev)),
          h("span", {}, s.to ? ["flow ", h("code", {}, s.to)] : h("span", { class: "muted" }, "parked")),
          h("span", { title: when(s.committed_at) }, `committed ${ago(s.committed_at)}`)),
        h("div", { class: "facts" }, h("span", {}, "labels "), chips(s.labels))),
      this.actionsEl(doc, message),
      this.waitingEl(doc.waiting),
      h("section", { class: "panel" },
        h("h3", {}, "Timeline"),
        h("p", { class: "note" }, "Every revision, newest first. Tick two to compare them, or open the changes of one revision."),
        h("div", { class: "compare-bar" },
          this.compareButton = h("button", { id: "compare", disabled: true, onclick: () => this.compare() }, "Compare selected"),
          h("span", { class: "muted small", id: "compare-hint" }, " select two revisions")),
        this.diffBox,
        this.timeline,
        doc.before ? h("button", { id: "older-revs", onclick: () => this.older(doc.before) }, "Older revisions ›") : null),
      this.dataEl(doc.data));
  }

  actionsEl(doc, message) {
    const status = h("span", { class: "action-status", id: "action-status", role: "status" }, message || "");
    const act = (name, label, help) => {
      const button = h("button", { id: `action-${name}`, class: name === "end" ? "danger" : "primary", disabled: !doc.actions[name], title: help });
      const reset = () => { button.dataset.armed = ""; fill(button, label); };
      reset();
      button.addEventListener("click", async () => {
        if (!button.dataset.armed) {
          button.dataset.armed = "1";
          fill(button, `Confirm: ${label.toLowerCase()}?`);
          setTimeout(() => { if (button.isConnected && button.dataset.armed) reset(); }, 5000);
          return;
        }
        button.disabled = true;
        try {
          const res = await post(name, { id: doc.state.id, rev: doc.state.rev });
          await this.load(`${label}: committed rev ${res.state.rev}.`);
        } catch (err) {
          button.disabled = false;
          reset();
          status.className = "action-status error";
          fill(status, err instanceof ApiError && err.status === 409 ? `Refused: ${err.message}` : err.message);
        }
      });
      return button;
    };
    return h("div", { class: "actions" },
      act("retry", "Retry now", "Re-commit this transition (checked against this rev) and execute it"),
      act("end", "End", "Commit the state as ended (checked against this rev)"),
      status);
  }

  waitingEl(w) {
    const box = h("section", { class: "panel waiting", id: "waiting" }, h("h3", {}, w.parked ? "Parked" : "Why is it waiting?"));
    box.append(h("ul", { class: "reasons" }, w.reasons.map((r) => h("li", {}, r))));
    if (w.recovery) {
      const r = w.recovery;
      box.append(h("table", { class: "kv" },
        h("tr", {}, h("th", {}, "since last commit"), h("td", {}, span(r.since_commit_seconds))),
        h("tr", {}, h("th", {}, "retry after"), h("td", {}, span(r.retry_after_seconds))),
        h("tr", {}, h("th", {}, "next recovery"), h("td", { title: when(r.due_at) }, r.enabled ? (r.due_in_seconds >= 0 ? `in ${span(r.due_in_seconds)}` : `overdue by ${span(r.due_in_seconds)}`) : "disabled")),
        h("tr", {}, h("th", {}, "attempts"), h("td", {}, `${r.attempt} of ${r.max_attempts} used, ${r.attempts_left} left`))));
    }
    if (w.delays.length) {
      box.append(h("h4", {}, "Pending delays"), h("table", { class: "grid" },
        h("tr", {}, ["to", "fires", "at", "of rev", "commits"].map((c) => h("th", {}, c))),
        w.delays.map((d) => h("tr", { class: d.stale ? "stale" : "" },
          h("td", {}, h("code", {}, d.to)), h("td", {}, ago(d.execute_at)), h("td", {}, when(d.execute_at)),
          h("td", {}, d.rev, d.stale ? " (stale)" : ""), h("td", {}, d.commit ? "yes" : "no")))));
    }
    return box;
  }

  revisionEl(r, previous) {
    const pick = h("input", { type: "checkbox", class: "pick", "aria-label": `compare rev ${r.rev}`, onchange: (e) => this.togglePick(r.rev, e.target.checked) });
    const changes = h("div", { class: "changes" });
    return h("li", { class: "revision", dataset: { rev: String(r.rev) } },
      h("div", { class: "rev-head" },
        h("label", { class: "pick-label" }, pick, h("strong", {}, `rev ${r.rev}`)),
        r.to ? h("span", {}, "→ ", h("code", {}, r.to)) : h("span", { class: "muted" }, "parked"),
        badges(r.statuses),
        h("span", { class: "muted", title: when(r.committed_at) }, when(r.committed_at)),
        previous ? h("button", { class: "link", onclick: () => this.showChanges(changes, previous.rev, r.rev) }, `changes since rev ${previous.rev}`) : null),
      h("div", { class: "rev-body" },
        h("div", {}, h("h5", {}, "transition annotations"), kvTable(r.transition_annotations)),
        h("div", {}, h("h5", {}, "annotations"), kvTable(r.annotations)),
        h("div", {}, h("h5", {}, "labels"), kvTable(r.labels))),
      changes);
  }

  togglePick(rev, on) {
    this.picked = this.picked.filter((x) => x !== rev);
    if (on) this.picked.push(rev);
    while (this.picked.length > 2) {
      const drop = this.picked.shift();
      const box = this.timeline.querySelector(`li[data-rev="${drop}"] input.pick`);
      if (box) box.checked = false;
    }
    this.compareButton.disabled = this.picked.length !== 2;
  }

  async compare() {
    const [a, b] = [...this.picked].sort((x, y) => x - y);
    await this.showChanges(this.diffBox, a, b);
  }

  async showChanges(box, a, b) {
    try {
      const d = await get("diff", { id: this.id, a, b });
      fill(box, h("h4", {}, `From rev ${a} to rev ${b}`), diffTable(d.changes));
    } catch (err) {
      fill(box, h("p", { class: "error" }, err.message));
    }
  }

  async older(before) {
    try {
      const more = await get("state", { id: this.id, before });
      const last = more.revisions;
      last.forEach((r, i) => this.timeline.append(this.revisionEl(r, last[i + 1])));
      document.getElementById("older-revs")?.remove();
      if (more.before) this.timeline.after(h("button", { id: "older-revs", onclick: () => this.older(more.before) }, "Older revisions ›"));
    } catch (err) {
      this.timeline.after(h("p", { class: "error" }, err.message));
    }
  }

  dataEl(refs) {
    const section = h("section", { class: "panel", id: "data" }, h("h3", {}, "Data"));
    if (!refs.length) {
      section.append(h("p", { class: "muted" }, "No data attached."));
      return section;
    }
    section.append(h("ul", { class: "data-list" }, refs.map((ref) => h("li", {},
      h("code", {}, ref.alias), h("span", { class: "muted" }, ` data rev ${ref.rev} `),
      h("button", { class: "link", dataset: { alias: ref.alias }, onclick: () => this.preview(ref.alias) }, "show"),
      h("button", { class: "link", onclick: () => download("data/raw", { id: this.id, alias: ref.alias }, ref.alias) }, "download")))),
    this.dataBox);
    return section;
  }

  async preview(alias) {
    try {
      const d = await get("data", { id: this.id, alias });
      fill(this.dataBox,
        h("p", {}, h("code", {}, alias), ` — ${d.size} bytes, ${d.binary ? "binary (hex)" : "text"}${d.truncated ? ", preview cut" : ""}`),
        h("pre", { class: d.binary ? "hex" : "text" }, d.binary ? d.hex : d.text));
    } catch (err) {
      fill(this.dataBox, h("p", { class: "error" }, err.message));
    }
  }
}

function diffTable(changes) {
  if (!changes.length) return h("p", { class: "muted" }, "No differences.");
  return h("table", { class: "grid diff" },
    h("tr", {}, ["", "where", "key", "before", "after"].map((c) => h("th", {}, c))),
    changes.map((c) => h("tr", { class: `d-${c.kind}` },
      h("td", { class: "mark" }, c.kind === "added" ? "+" : c.kind === "removed" ? "−" : "~"),
      h("td", {}, c.section), h("td", {}, h("code", {}, c.key)),
      h("td", {}, c.old === null ? h("span", { class: "muted" }, "—") : h("code", {}, c.old)),
      h("td", {}, c.new === null ? h("span", { class: "muted" }, "—") : h("code", {}, c.new)))));
}
