// The server's UI API: fetch with the bearer token, JSON errors, and a live stream of
// Server-Sent Events read over fetch (EventSource cannot send an Authorization header).

const TOKEN_KEY = "flowstate.token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value, remember) {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  if (value) (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
}

function headers(extra = {}) {
  const out = { ...extra };
  const t = token();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

/** Listeners told when the server refuses the token. */
export const unauthorized = new EventTarget();

async function check(response) {
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (response.status === 401) unauthorized.dispatchEvent(new Event("unauthorized"));
  throw new ApiError(response.status, body);
}

/** Query string of a params object whose values may be arrays (repeated keys). */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    for (const v of Array.isArray(value) ? value : [value]) {
      if (v !== undefined && v !== null && v !== "") search.append(key, String(v));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export async function get(path, params) {
  const response = await fetch(`/ui/api/${path}${qs(params)}`, { headers: headers() });
  return (await check(response)).json();
}

export async function post(path, body) {
  const response = await fetch(`/ui/api/${path}`, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  return (await check(response)).json();
}

/** Download a URL of the API as a file (the token goes in a header, not in the link). */
export async function download(path, params, fallbackName) {
  const response = await check(await fetch(`/ui/api/${path}${qs(params)}`, { headers: headers() }));
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = match ? match[1] : fallbackName;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/**
 * Follow /ui/api/stream: onState(row) for each new version after `since`; onStatus(text)
 * with "live", "reconnecting" or "stopped". Reconnects after errors, resuming after the last
 * rev seen. Returns a function that stops it.
 */
export function live(params, since, onState, onStatus) {
  let stopped = false;
  let last = since;
  let controller = null;
  let delay = 500;

  async function run() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const response = await fetch(`/ui/api/stream${qs({ ...params, since: last })}`, {
          headers: headers({ Accept: "text/event-stream" }),
          signal: controller.signal,
        });
        await check(response);
        onStatus("live");
        delay = 500;
        await readEvents(response.body, (name, data, id) => {
          if (name === "state") {
            if (id) last = Math.max(last, Number(id));
            onState(JSON.parse(data));
          }
        });
      } catch (err) {
        if (stopped) break;
        if (err instanceof ApiError && err.status === 401) {
          onStatus("stopped");
          return;
        }
      }
      if (stopped) break;
      onStatus("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
    onStatus("stopped");
  }

  run();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}

async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
      if (data.length) onEvent(name, data.join("\n"), id);
    }
  }
}
