// The page: header, token prompt and a hash router between the states view and a state.

import { get, setToken, token, unauthorized } from "./api.js";
import { h, fill } from "./dom.js";
import { StatesView } from "./states.js";
import { DetailView } from "./detail.js";

class App {
  constructor() {
    this.main = document.getElementById("main");
    this.headEl = document.getElementById("head-rev");
    this.liveEl = document.getElementById("live");
    this.storeEl = document.getElementById("store");
    this.unhostedEl = document.getElementById("unhosted");
    this.heldEl = document.getElementById("held");
    this.infoTimer = null;
    this.dialog = document.getElementById("token-dialog");
    this.statesRoute = "#/states";
    this.views = { states: new StatesView(this.main, this), state: new DetailView(this.main, this) };
    this.current = null;
    window.addEventListener("hashchange", () => this.route());
    unauthorized.addEventListener("unauthorized", () => this.askToken());
    document.getElementById("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.target;
      setToken(form.token.value.trim(), form.remember.checked);
      this.dialog.close();
      this.start();
    });
    document.getElementById("forget-token").addEventListener("click", () => {
      setToken("", false);
      location.reload();
    });
  }

  async start() {
    try {
      const info = await get("info");
      fill(this.storeEl, `${info.store}`, info.recoverer ? " · recoverer" : "", info.delayer ? " · delayer" : "");
      this.setHead(info.head_rev);
      this.showUnhosted(info.unhosted);
      this.showHeld(info.readers_held);
      document.getElementById("forget-token").hidden = !token();
    } catch (err) {
      if (err.status !== 401) fill(this.main, h("p", { class: "error" }, `Cannot reach the server: ${err.message}`));
      return;
    }
    // The report changes as hosts come and go: look again now and then.
    if (this.infoTimer === null) this.infoTimer = setInterval(() => this.refreshInfo(), 15000);
    this.route();
  }

  async refreshInfo() {
    try {
      const info = await get("info");
      this.showUnhosted(info.unhosted);
      this.showHeld(info.readers_held);
    } catch {
      // a failed look leaves the last report; the views show their own errors
    }
  }

  /** A banner per flow whose due states wait because no process hosts it ({flow: count}). */
  showUnhosted(unhosted) {
    const flows = Object.entries(unhosted || {});
    this.unhostedEl.hidden = flows.length === 0;
    fill(this.unhostedEl, flows.map(([flow, n]) =>
      h("p", {}, "no process hosts flow ", h("code", {}, flow), ` (${n} ${n === 1 ? "state" : "states"} waiting)`)));
  }

  /** A banner while a commit of the store is stuck in flight: nothing past its rev shows. */
  showHeld(held) {
    this.heldEl.hidden = !held;
    if (!held) return;
    fill(this.heldEl, h("p", {},
      `readers are held at rev ${held.rev}: its commit has been in flight for ${Math.round(held.in_flight_s)} s `,
      `(server pid ${held.pid}, ${held.application || "unknown application"}, ${held.state || "unknown state"}); `,
      "newer states show once PostgreSQL ends that transaction"));
  }

  askToken() {
    if (this.current) this.current.destroy();
    this.setLive("stopped");
    const form = document.getElementById("token-form");
    form.token.value = "";
    fill(document.getElementById("token-message"), token() ? "The server refused this token." : "This server requires a token.");
    if (!this.dialog.open) this.dialog.showModal();
    form.token.focus();
  }

  go(hash) {
    if (location.hash === hash) this.route();
    else location.hash = hash;
  }

  route() {
    const hash = location.hash.replace(/^#/, "") || "/states";
    const [path, search] = hash.split("?");
    const params = new URLSearchParams(search || "");
    const view = path === "/state" ? this.views.state : this.views.states;
    if (view === this.views.states) this.statesRoute = `#${hash}`;
    if (this.current && this.current !== view) this.current.destroy();
    this.current = view;
    document.body.dataset.view = path === "/state" ? "state" : "states";
    view.show(params);
  }

  setHead(rev) {
    fill(this.headEl, `head rev ${rev}`);
  }

  setLive(status) {
    this.liveEl.dataset.status = status;
    fill(this.liveEl, { live: "live", reconnecting: "reconnecting…", paused: "paused (older page)", stopped: "not live" }[status] || status);
  }
}

new App().start();
