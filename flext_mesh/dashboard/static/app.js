// flext-mesh dashboard. Plain ES module, no build step, no dependency but uPlot
// (a global from vendor/uPlot.iife.min.js). Reads the JSON API under /api/v1 and two
// server-sent event streams; every piece of text goes into the page as text (never as
// HTML), so names and messages from the mesh cannot inject markup.

const API = "/api/v1";
const TOKEN_COOKIE = "flext_mesh_token";
const WINDOWS = ["5m", "15m", "1h", "6h", "24h"];

// -- small helpers -------------------------------------------------------------------

/** An element: h("td", {class: "num"}, "12"); attributes "on*" take functions. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, String(value));
  }
  el.append(...children);
  return el;
}

/** ``text`` cut to ``max`` characters with an ellipsis (SVG text does not wrap). */
const clip = (text, max) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

/** "STEP_STATE_RUNNING" -> "RUNNING". */
const short = (name, prefix) => (name || "").replace(prefix, "");

/** Milliseconds since the epoch of an RFC 3339 timestamp (nanoseconds trimmed). */
function parseTime(text) {
  if (!text) return null;
  const ms = Date.parse(String(text).replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(ms) ? null : ms;
}

/** Seconds of a proto3 JSON duration ("1.5s"). */
const durationSeconds = (text) => (text ? parseFloat(text) : 0);

function fmtMs(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
  return `${value.toFixed(value < 10 ? 2 : 1)} ms`;
}
const fmtPct = (ratio) => (Number.isFinite(ratio) ? `${(ratio * 100).toFixed(ratio < 0.1 ? 2 : 1)}%` : "–");
const fmtClock = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "–");
function fmtAge(ms) {
  if (!ms) return "–";
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 60) return `${seconds}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  return `${Math.floor(seconds / 3600)}h ago`;
}
function fmtSpan(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)}m ${Math.round(seconds % 60)}s`;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** GET a JSON document of the API; a 401 opens the token form. */
async function api(path) {
  const response = await fetch(API + path, {
    headers: { Accept: "application/json" },
    credentials: "same-origin",
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) askToken();
    throw new ApiError(response.status, body?.error?.message || response.statusText);
  }
  return body;
}

/** POST a JSON body to an action of the API; its JSON answer. */
async function post(path, body) {
  const response = await fetch(API + path, {
    method: "POST",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    credentials: "same-origin",
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) askToken();
    throw new ApiError(response.status, answer?.error?.message || response.statusText);
  }
  return answer;
}

/** The actions this page's token may do ({cancel_execution: true, ...}), asked once. */
let permissions = null;
async function mayDo(action) {
  if (!permissions) permissions = api("/permissions").then((p) => p.actions || {}).catch(() => ({}));
  return Boolean((await permissions)[action]);
}

function banner(text) {
  const el = document.getElementById("banner");
  el.textContent = text || "";
  el.hidden = !text;
}

// -- token ---------------------------------------------------------------------------

function askToken() {
  const dialog = document.getElementById("token-dialog");
  if (!dialog.open) dialog.showModal();
}

function setupToken() {
  const dialog = document.getElementById("token-dialog");
  document.getElementById("token-button").addEventListener("click", askToken);
  dialog.addEventListener("close", () => {
    const secure = location.protocol === "https:" ? "; Secure" : "";
    const input = document.getElementById("token-input");
    if (dialog.returnValue === "save" && input.value.trim()) {
      const value = encodeURIComponent(input.value.trim());
      document.cookie = `${TOKEN_COOKIE}=${value}; Path=/; SameSite=Strict${secure}`;
    } else if (dialog.returnValue === "clear") {
      document.cookie = `${TOKEN_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict${secure}`;
    } else {
      return;
    }
    input.value = "";
    permissions = null; // another token, other rights
    registry.connect();
    route();
  });
}

// -- the registry, live ----------------------------------------------------------------

/** Every instance by "service/id", kept current by the registry event stream. */
class RegistryState {
  constructor() {
    this.instances = new Map();
    this.removed = new Map(); // key -> {instance, reason, at}: shown greyed for a while
    this.policies = new Map();
    this.revision = 0;
    this.source = null;
    this.listeners = new Set();
    this.loaded = false;
  }

  connect() {
    if (this.source) this.source.close();
    const live = document.getElementById("live");
    const from = this.revision ? `?from_revision=${this.revision}` : "";
    const source = new EventSource(`${API}/events/registry${from}`);
    this.source = source;
    live.dataset.state = "connecting";
    live.textContent = "connecting";
    source.onopen = () => {
      live.dataset.state = "live";
      live.textContent = "live";
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (a 401) or gone: find out why, then try again later.
        live.dataset.state = "disconnected";
        live.textContent = "disconnected";
        api("/services?page_size=1").catch(() => {});
        setTimeout(() => this.source === source && this.connect(), 5000);
      } else {
        live.dataset.state = "reconnecting";
        live.textContent = "reconnecting";
      }
    };
    source.addEventListener("snapshot", (e) => this.onSnapshot(JSON.parse(e.data)));
    source.addEventListener("change", (e) => this.onChange(JSON.parse(e.data)));
    source.addEventListener("progress", (e) => {
      this.revision = Math.max(this.revision, Number(JSON.parse(e.data).revision || 0));
    });
    source.addEventListener("stream_error", (e) => {
      banner(`registry stream: ${JSON.parse(e.data).error.message}`);
    });
  }

  onSnapshot(message) {
    this.instances.clear();
    this.policies.clear();
    for (const instance of message.snapshot.instances || []) {
      this.instances.set(`${instance.service_name}/${instance.instance_id}`, instance);
    }
    for (const policy of message.snapshot.policies || []) this.policies.set(policy.service_name, policy);
    this.revision = Number(message.revision || 0);
    this.loaded = true;
    this.changed();
    this.loadRemoved();
  }

  /** Instances removed before the page opened (or while it was disconnected): the
   * control plane remembers them for a few minutes. */
  async loadRemoved() {
    let answer;
    try {
      answer = await api("/removed");
    } catch {
      return; // the page works without them
    }
    removedShownMs = Number(answer.kept_seconds || 60) * 1000;
    for (const gone of answer.removed || []) {
      const instance = gone.instance;
      const key = `${instance.service_name}/${instance.instance_id}`;
      if (this.instances.has(key) || this.removed.has(key)) continue;
      const reason = removalReason(gone.removal_reason);
      this.removed.set(key, { instance, reason, at: parseTime(gone.removed_time) || Date.now() });
    }
    this.changed();
  }

  onChange(message) {
    for (const event of message.events || []) {
      const type = short(event.type, "WATCH_EVENT_TYPE_");
      if (type === "POLICY_PUT") {
        this.policies.set(event.service_name, event.policy);
        continue;
      }
      if (type === "POLICY_DELETED") {
        this.policies.delete(event.service_name);
        continue;
      }
      const instance = event.instance;
      const key = `${instance.service_name}/${instance.instance_id}`;
      if (type === "REMOVED") {
        this.instances.delete(key);
        this.removed.set(key, { instance, reason: removalReason(event.removal_reason), at: Date.now() });
      } else {
        this.instances.set(key, instance);
        this.removed.delete(key);
      }
    }
    this.revision = Number(message.revision || this.revision);
    this.changed();
  }

  changed() {
    for (const listener of this.listeners) listener();
  }

  services() {
    const names = new Set();
    for (const instance of this.instances.values()) names.add(instance.service_name);
    for (const { instance } of this.removed.values()) names.add(instance.service_name);
    return [...names].sort();
  }
}

const registry = new RegistryState();

/** "REMOVAL_REASON_LEASE_EXPIRED" -> "lease expired". */
const removalReason = (name) => short(name, "REMOVAL_REASON_").toLowerCase().replaceAll("_", " ");

/** [css class suffix, text] of an instance's health; the text carries the meaning. */
function health(instance, removed) {
  if (removed) return ["removed", `removed (${removed.reason})`];
  if (instance.maintenance) {
    return ["drained", instance.maintenance_reason ? `drained (${instance.maintenance_reason})` : "drained"];
  }
  if (instance.ejected) {
    const until = parseTime(instance.ejected_until);
    return ["ejected", until ? `ejected until ${fmtClock(until)}` : "ejected"];
  }
  switch (short(instance.health, "HEALTH_STATUS_")) {
    case "SERVING":
      return ["healthy", "healthy"];
    case "NOT_SERVING":
      return ["unhealthy", "unhealthy"];
    case "DRAINING":
      return ["draining", "draining"];
    default:
      return ["unknown", "not checked yet"];
  }
}

// -- view: services ------------------------------------------------------------------------

/** How long a removed instance stays on the page: as long as the control plane
 * remembers it (GET /removed says; 60 s until then). */
let removedShownMs = 60_000;

/** Every second: refresh the ages in place; drop removed rows shown long enough. */
function tickServices() {
  const now = Date.now();
  let expired = false;
  for (const [key, gone] of registry.removed) {
    if (now - gone.at > removedShownMs) {
      registry.removed.delete(key);
      expired = true;
    }
  }
  if (expired) {
    renderServices();
    return;
  }
  for (const cell of document.querySelectorAll("#view-services [data-since]")) {
    cell.textContent = fmtAge(Number(cell.dataset.since));
  }
}

function renderServices() {
  const view = document.getElementById("view-services");
  const names = registry.services();
  const children = [h("h2", {}, "Services")];
  if (!registry.loaded) children.push(h("div", { class: "empty" }, "Loading the registry…"));
  else if (!names.length) children.push(h("div", { class: "empty" }, "No service is registered."));
  for (const name of names) {
    const live = [...registry.instances.values()].filter((i) => i.service_name === name);
    const gone = [...registry.removed.values()].filter((g) => g.instance.service_name === name);
    live.sort((a, b) => a.instance_id.localeCompare(b.instance_id));
    const healthy = live.filter((i) => health(i)[0] === "healthy").length;
    const drained = live.filter((i) => i.maintenance).length;
    const policy = registry.policies.get(name);
    const rows = [
      ...live.map((instance) => instanceRow(instance)),
      ...gone.map((g) => instanceRow(g.instance, g)),
    ];
    const bad = live.length - healthy;
    children.push(
      h(
        "article",
        { class: "card", dataset: { service: name } },
        h(
          "header",
          {},
          h("h3", {}, name),
          h(
            "span",
            { class: "counts" },
            `${healthy} of ${live.length} healthy`,
            bad - drained ? h("span", { class: "bad" }, ` · ${bad - drained} not healthy`) : null,
            drained ? h("span", { class: "muted" }, ` · ${drained} drained`) : null,
          ),
          policy ? h("span", { class: "muted" }, `policy v${policy.version}`) : null,
          h("span", { style: "flex:1" }),
          h("a", { href: `#/metrics/${encodeURIComponent(name)}` }, "latency & errors →"),
        ),
        h(
          "div",
          { class: "body" },
          h(
            "table",
            { class: "instances" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, "Instance"),
                h("th", {}, "Endpoint"),
                h("th", {}, "Version"),
                h("th", {}, "Zone"),
                h("th", {}, "Health"),
                h("th", { class: "num" }, "Weight"),
                h("th", { class: "num" }, "Response time"),
                h("th", { class: "num" }, "Uptime"),
                h("th", {}, "Registered"),
              ),
            ),
            h("tbody", {}, rows),
          ),
          live.length ? explainDetails(name) : null,
        ),
      ),
    );
  }
  view.replaceChildren(...children);
}

// Why each instance weighs what it does (GET /services/NAME/explain), per open card.
const explained = new Map(); // service -> {at, rows | error}

function explainDetails(name) {
  const details = h("details", { class: "explain", dataset: { explain: name } }, h("summary", {}, "Why these weights?"));
  const body = h("div", { class: "explain-body" });
  details.append(body);
  const known = explained.get(name);
  if (known) {
    details.open = true;
    body.replaceChildren(explainTable(known));
    if (!known.loading && Date.now() - known.at > 5_000) loadExplain(name);
  }
  details.addEventListener("toggle", () => {
    if (details.open && !explained.has(name)) loadExplain(name);
    else if (!details.open) explained.delete(name);
  });
  return details;
}

/** Fetch a service's explanations, then show them wherever its card now is (the
 * registry stream may have rendered the cards again meanwhile). */
async function loadExplain(name) {
  const before = explained.get(name);
  explained.set(name, { ...(before || { at: 0 }), loading: true });
  if (!before) paintExplain(name);
  let known;
  try {
    const answer = await api(`/services/${encodeURIComponent(name)}/explain`);
    known = { at: Date.now(), rows: answer.explanations || [] };
  } catch (error) {
    known = { at: Date.now(), error: error.message };
  }
  if (!explained.has(name)) return; // closed meanwhile
  explained.set(name, known);
  paintExplain(name);
}

function paintExplain(name) {
  const known = explained.get(name);
  for (const details of document.querySelectorAll("details[data-explain]")) {
    if (details.dataset.explain === name) details.querySelector(".explain-body").replaceChildren(explainTable(known));
  }
}

const factor = (value) => `× ${Number(value || 0).toFixed(2)}`;

function explainTable(known) {
  if (known.error) return h("div", { class: "empty" }, known.error);
  if (!known.rows) return h("div", { class: "muted" }, "Loading…");
  return h(
    "table",
    { class: "explain-table" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, "Instance"),
        h("th", { class: "num" }, "Base"),
        h("th", { class: "num" }, "Health"),
        h("th", { class: "num" }, "Latency"),
        h("th", { class: "num" }, "Errors"),
        h("th", {}, "Ejected"),
        h("th", {}, "Drained"),
        h("th", { class: "num" }, "Split"),
        h("th", { class: "num" }, "Effective"),
        h("th", {}, "In answer"),
      ),
    ),
    h(
      "tbody",
      {},
      known.rows.map((e) =>
        h(
          "tr",
          { dataset: { instance: e.instance_id } },
          h("td", { class: "mono" }, e.instance_id),
          h("td", { class: "num" }, String(e.base_weight || 0)),
          h("td", { class: "num", title: short(e.health, "HEALTH_STATUS_") }, factor(e.health_factor)),
          h(
            "td",
            { class: "num", title: `${fmtMs(e.response_time_ms)} vs median ${fmtMs(e.service_median_ms)}` },
            factor(e.latency_factor),
          ),
          h("td", { class: "num", title: `${fmtPct(e.infrastructure_error_rate)} infrastructure errors` }, factor(e.error_factor)),
          h("td", {}, e.ejected ? `until ${fmtClock(parseTime(e.ejected_until))}` : "no"),
          h("td", { title: e.maintenance_reason || "" }, e.maintenance ? "yes × 0" : "no"),
          h("td", { class: "num" }, e.split_weight ? `${e.split_weight}%` : "–"),
          h("td", { class: "num" }, Number(e.effective_weight || 0).toFixed(1)),
          h("td", {}, e.in_answer ? "yes" : "no"),
        ),
      ),
    ),
  );
}

/** A card holding one table: its id, header cells and body rows. */
function tableCard(id, headers, rows) {
  return h("div", { class: "card" }, h("div", { class: "body" }, h("table", { id }, h("thead", {}, h("tr", {}, headers)), h("tbody", {}, rows))));
}

// -- view: sidecars (what each has applied of the registry) -------------------------------

async function renderStatus() {
  const view = document.getElementById("view-status");
  let answer;
  try {
    answer = await api("/status");
  } catch (error) {
    view.replaceChildren(h("h2", {}, "Sidecars"), h("div", { class: "empty" }, error.message));
    return;
  }
  const rows = answer.instances || [];
  const late = rows.filter((r) => r.state === "STALE" || r.state === "BEHIND").length;
  view.replaceChildren(
    h("h2", {}, "Sidecars"),
    h(
      "p",
      { class: "muted" },
      `Registry revision ${answer.revision}. Each sidecar says on its KeepAlive stream which revision its mesh client has applied; `,
      `behind and not moving for ${answer.stale_after_seconds} s is STALE. `,
      late ? h("span", { class: "bad" }, `${late} not up to date.`) : "All up to date.",
    ),
    rows.length
      ? tableCard(
          "status-table",
          [
            h("th", {}, "Service"),
            h("th", {}, "Instance"),
            h("th", { class: "num" }, "Applied"),
            h("th", { class: "num" }, "Behind"),
            h("th", { class: "num" }, "Said"),
            h("th", {}, "State"),
          ],
          rows.map((r) =>
            h(
              "tr",
              { dataset: { instance: r.instance_id, state: r.state } },
              h("td", {}, r.service_name),
              h("td", { class: "mono" }, r.instance_id),
              h("td", { class: "num" }, r.state === "-" ? "–" : r.applied_revision),
              h("td", { class: "num" }, r.state === "-" ? "–" : String(r.behind)),
              h("td", { class: "num" }, r.state === "-" ? "–" : `${Math.round(r.since_seconds)}s ago`),
              h(
                "td",
                {},
                h(
                  "span",
                  { class: `badge state-${r.state === "-" ? "none" : r.state.toLowerCase()}` },
                  r.state === "-" ? "never said" : r.state,
                ),
              ),
            ),
          ),
        )
      : h("div", { class: "empty" }, "No instance is registered."),
  );
}

// -- view: xDS clients (proxyless gRPC clients and where each stands) ---------------------

const XDS_PREFIX = "XDS_SYNC_STATE_";
const xdsState = (value) => String(value || "").replace(XDS_PREFIX, "");

/** One resource type in short, as `flext-mesh xds status` prints it. */
function xdsCell(type) {
  const state = xdsState(type.state);
  if (state === "SYNCED") return `SYNCED v${type.version_acked}`;
  if (state === "NACKED") return `NACK v${type.version_sent}`;
  if (state === "STALE") return `STALE v${type.version_sent} (sent ${fmtAge(parseTime(type.last_send_time))})`;
  if (state === "PENDING") return `PENDING v${type.version_sent}`;
  return "–";
}

async function renderXds() {
  const view = document.getElementById("view-xds");
  let answer;
  try {
    answer = await api("/xds?page_size=1000");
  } catch (error) {
    view.replaceChildren(h("h2", {}, "xDS clients"), h("div", { class: "empty" }, error.message));
    return;
  }
  const clients = answer.clients || [];
  const troubled = clients.filter((c) => ["STALE", "NACKED"].includes(xdsState(c.state))).length;
  const staleAfter = durationSeconds(answer.stale_after);
  view.replaceChildren(
    h("h2", {}, "xDS clients"),
    h(
      "p",
      { class: "muted" },
      `Proxyless gRPC clients (xds:///SERVICE) connected to this replica, registry revision ${answer.registry_revision}. `,
      `A version sent and not answered for ${staleAfter} s is STALE; NACK: the client rejected the last version and keeps the one it last ACKed. `,
      troubled ? h("span", { class: "bad" }, `${troubled} not in sync.`) : clients.length ? "All in sync." : "",
    ),
    clients.length
      ? tableCard(
          "xds-table",
          [
            h("th", {}, "Node"),
            h("th", {}, "Zone"),
            ...(clients[0].types || []).map((t) => h("th", {}, t.type)),
            h("th", {}, "State"),
            h("th", { class: "num" }, "Last ACK"),
            h("th", {}, "User agent"),
            h("th", {}, "Peer"),
            h("th", {}, "Last NACK error"),
          ],
          clients.map((c) => {
            const types = c.types || [];
            const acks = types.map((t) => parseTime(t.last_ack_time)).filter(Boolean);
            const error = types.map((t) => t.last_nack_error).find(Boolean) || "";
            const state = xdsState(c.state);
            return h(
              "tr",
              { dataset: { node: c.node_id, state } },
              h("td", { class: "mono" }, c.node_id || "–"),
              h("td", {}, c.zone || "–"),
              ...types.map((t) =>
                h("td", { class: `xds-type state-${xdsState(t.state).toLowerCase()}`, dataset: { type: t.type } }, xdsCell(t)),
              ),
              h("td", {}, h("span", { class: `badge state-${state.toLowerCase()}` }, state.replace("_", " "))),
              h("td", { class: "num" }, acks.length ? fmtAge(Math.max(...acks)) : "–"),
              h("td", {}, c.user_agent || "–"),
              h("td", { class: "mono" }, c.peer || "–"),
              error ? h("td", { class: "nack-error", title: error }, error.slice(0, 120)) : h("td", {}, "–"),
            );
          }),
        )
      : h("div", { class: "empty" }, "No xDS client is connected to this replica."),
  );
}

function instanceRow(instance, removed = null) {
  const [kind, text] = health(instance, removed);
  const weight = `${Number(instance.effective_weight || 0).toFixed(1)} / ${instance.weight || 100}`;
  return h(
    "tr",
    { class: removed ? "gone" : "", dataset: { instance: instance.instance_id, health: kind } },
    h("td", { class: "id mono" }, instance.instance_id),
    h("td", { class: "mono" }, instance.endpoint),
    h("td", {}, instance.version || "–"),
    h("td", {}, instance.zone || "–"),
    h("td", {}, h("span", { class: `badge health health-${kind}` }, text)),
    h("td", { class: "num" }, weight),
    h("td", { class: "num" }, instance.response_time_ms ? fmtMs(instance.response_time_ms) : "–"),
    h("td", { class: "num" }, `${Number(instance.uptime_percentage || 0).toFixed(1)}%`),
    h("td", { dataset: { since: parseTime(instance.register_time) || "" } }, fmtAge(parseTime(instance.register_time))),
  );
}

// -- view: latency and errors ------------------------------------------------------------

const metricsState = { service: "", window: "15m", operation: "", charts: [], timer: null };

async function renderMetrics(service) {
  const view = document.getElementById("view-metrics");
  // Services, then each workflow's own series (workflow/NAME: its executions and steps).
  let workflows = [];
  try {
    workflows = (await api("/workflows?page_size=1000")).workflows.map((w) => `workflow/${w.name}`);
  } catch (error) {
    workflows = []; // the services' metrics still show
  }
  const names = [...registry.services(), ...workflows];
  const chosen = service || metricsState.service || names[0] || "";
  if (chosen !== metricsState.service) metricsState.operation = ""; // another service's
  metricsState.service = chosen;
  const pick = h(
    "select",
    {
      id: "metrics-service",
      onchange: (e) => {
        location.hash = `#/metrics/${encodeURIComponent(e.target.value)}`;
      },
    },
    (names.includes(metricsState.service) || !metricsState.service
      ? names
      : [metricsState.service, ...names]
    ).map((n) => h("option", { value: n, selected: n === metricsState.service }, n)),
  );
  const windowPick = h(
    "select",
    {
      id: "metrics-window",
      onchange: (e) => {
        metricsState.window = e.target.value;
        loadMetrics();
      },
    },
    WINDOWS.map((w) => h("option", { value: w, selected: w === metricsState.window }, `last ${w}`)),
  );
  view.replaceChildren(
    h("h2", {}, "Latency & errors"),
    h(
      "div",
      { class: "toolbar" },
      h("label", {}, "Service", pick),
      h("label", {}, "Window", windowPick),
      h("label", {}, "Operation", h("select", { id: "metrics-operation" })),
    ),
    h("div", { id: "metrics-body" }, h("div", { class: "empty" }, "Loading…")),
  );
  document.getElementById("metrics-operation").addEventListener("change", (e) => {
    metricsState.operation = e.target.value;
    loadMetrics();
  });
  await loadMetrics();
}

async function loadMetrics() {
  const service = metricsState.service;
  const body = document.getElementById("metrics-body");
  if (!body) return;
  if (!service) {
    body.replaceChildren(h("div", { class: "empty" }, "No service is registered."));
    return;
  }
  const name = encodeURIComponent(service);
  const query = `window=${metricsState.window}`;
  const operation = metricsState.operation ? `&operation=${encodeURIComponent(metricsState.operation)}` : "";
  let report;
  let series;
  try {
    [report, series] = await Promise.all([
      api(`/services/${name}/report?${query}`),
      api(`/services/${name}/series?${query}${operation}`),
    ]);
  } catch (error) {
    if (metricsState.service !== service) return;
    destroyCharts();
    const text = error.status === 404 ? `No call of ${service} recorded in the last ${metricsState.window}.` : error.message;
    body.replaceChildren(h("div", { class: "empty" }, text));
    return;
  }
  if (metricsState.service !== service || !document.getElementById("metrics-body")) return;
  const r = report.report;
  const ops = r.operations.map((o) => o.operation);
  const select = document.getElementById("metrics-operation");
  select.replaceChildren(
    h("option", { value: "" }, "all operations"),
    ...ops.map((o) => h("option", { value: o, selected: o === metricsState.operation }, o)),
  );
  const focus = metricsState.operation ? r.operations.find((o) => o.operation === metricsState.operation) || r.summary : r.summary;
  const figure = (label, value, extra = {}) =>
    h("div", { class: "figure", ...extra }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
  const latencyChart = h("div", { class: "chart card", id: "latency-chart" });
  const errorChart = h("div", { class: "chart card", id: "error-chart" });
  const rateChart = h("div", { class: "chart card", id: "rate-chart" });
  body.replaceChildren(
    h(
      "div",
      { class: "summary" },
      figure("Health score", Number(focus.health_score).toFixed(0), { id: "health-score" }),
      figure("Grade", h("span", { class: `grade grade-${focus.grade}` }, focus.grade), { id: "grade" }),
      figure("Calls", Number(focus.total_calls).toLocaleString()),
      figure("Error rate", fmtPct(focus.error_rate)),
      figure("p50", fmtMs(focus.p50_ms)),
      figure("p95", fmtMs(focus.p95_ms)),
      figure("p99", fmtMs(focus.p99_ms)),
      figure("Throughput", `${Number(focus.throughput_per_second).toFixed(2)}/s`),
      figure("Trend", short(focus.trend, "TREND_").toLowerCase().replace("_", " "), { class: "figure small" }),
    ),
    h("div", { class: "charts" }, rateChart, latencyChart, errorChart),
    alertsCard(r),
    operationsCard(r),
  );
  drawCharts(series, latencyChart, errorChart, rateChart);
}

function alertsCard(report) {
  const alerts = report.alerts || [];
  const items = alerts.map((a) =>
    h(
      "li",
      {},
      h("span", { class: `severity severity-${short(a.severity, "ALERT_SEVERITY_")}` }, short(a.severity, "ALERT_SEVERITY_")),
      a.message,
      a.fire_time ? h("span", { class: "muted" }, ` · since ${fmtClock(parseTime(a.fire_time))}`) : null,
    ),
  );
  const tips = (report.recommendations || []).map((text) => h("li", {}, text));
  return h(
    "div",
    { class: "card", id: "alerts" },
    h("header", {}, h("h3", {}, "Active alerts"), h("span", { class: "muted" }, String(alerts.length))),
    h(
      "div",
      { class: "body" },
      items.length ? h("ul", { class: "alerts" }, items) : h("span", { class: "muted" }, "No alert is firing."),
      tips.length ? h("ul", { class: "muted" }, tips) : null,
    ),
  );
}

function operationsCard(report) {
  const rows = report.operations.map((o) =>
    h(
      "tr",
      {
        class: `selectable ${o.operation === metricsState.operation ? "selected" : ""}`,
        dataset: { operation: o.operation },
        onclick: () => {
          metricsState.operation = o.operation === metricsState.operation ? "" : o.operation;
          loadMetrics();
        },
      },
      h("td", { class: "mono" }, o.operation),
      h("td", { class: "num" }, Number(o.total_calls).toLocaleString()),
      h("td", { class: "num" }, fmtPct(o.error_rate)),
      h("td", { class: "num" }, fmtMs(o.p50_ms)),
      h("td", { class: "num" }, fmtMs(o.p95_ms)),
      h("td", { class: "num" }, fmtMs(o.p99_ms)),
      h("td", { class: "num" }, Number(o.health_score).toFixed(0)),
      h("td", {}, h("span", { class: `grade grade-${o.grade}` }, o.grade)),
    ),
  );
  const head = ["Operation", "Calls", "Errors", "p50", "p95", "p99", "Score", "Grade"].map((t, i) =>
    h("th", { class: i && i < 7 ? "num" : "" }, t),
  );
  return h(
    "div",
    { class: "card" },
    h("header", {}, h("h3", {}, "Operations"), h("span", { class: "muted" }, "click one to plot it alone")),
    h("div", { class: "body" }, h("table", {}, h("thead", {}, h("tr", {}, head)), h("tbody", {}, rows))),
  );
}

function destroyCharts() {
  for (const chart of metricsState.charts) chart.destroy();
  metricsState.charts = [];
}

function drawCharts(series, latencyEl, errorEl, rateEl) {
  destroyCharts();
  const which = series.operations.find((o) => o.operation === metricsState.operation) || series.operations[0];
  const times = series.time;
  const points = which.calls.filter((c) => c > 0).length;
  latencyEl.dataset.points = String(points);
  errorEl.dataset.points = String(points);
  rateEl.dataset.points = String(points);
  const width = Math.max(240, latencyEl.clientWidth - 24);
  const label = metricsState.operation || "all operations";
  // The x axis spans the data: from the first bucket with calls (not the start of a
  // 24 h window when the service is 7 minutes old) to now, at least a minute.
  const end = (parseTime(series.generate_time) || Date.now()) / 1000;
  const first = which.calls.findIndex((c) => c > 0);
  const windowStart = end - durationSeconds(series.window);
  const start = first < 0 ? windowStart : Math.max(windowStart, Math.min(Number(times[first]), end - 60));
  const x = { time: true, range: () => [start, end] };
  const base = { width, height: 220, scales: { x }, legend: { live: true } };
  const ms = (u, values) => values.map((v) => (v == null ? "" : fmtMs(v)));
  metricsState.charts.push(
    new uPlot(
      {
        ...base,
        title: `Latency, ${label}`,
        series: [
          {},
          { label: "p50", stroke: "#1a7f37", width: 2, spanGaps: false, value: (u, v) => fmtMs(v) },
          { label: "p95", stroke: "#bc4c00", width: 2, value: (u, v) => fmtMs(v) },
          { label: "p99", stroke: "#cf222e", width: 2, value: (u, v) => fmtMs(v) },
        ],
        axes: [{}, { values: ms, size: 70 }],
      },
      [times, which.p50_ms, which.p95_ms, which.p99_ms],
      latencyEl,
    ),
  );
  // Calls per second of each bucket: its calls over its width (buckets widen with age).
  const rate = which.calls.map((c, i) => (c > 0 ? c / Math.max(1, Number(series.width[i]) || 1) : null));
  metricsState.charts.push(
    new uPlot(
      {
        ...base,
        title: `Requests per second, ${label}`,
        scales: { x, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        series: [{}, { label: "calls/s", stroke: "#0969da", fill: "rgba(9,105,218,.08)", width: 2, value: (u, v) => (v == null ? "–" : v.toFixed(2)) }],
        axes: [{}, { size: 60 }],
      },
      [times, rate],
      rateEl,
    ),
  );
  const pct = (values) => values.map((v) => (v == null ? null : v * 100));
  metricsState.charts.push(
    new uPlot(
      {
        ...base,
        title: `Error rate, ${label}`,
        scales: { x, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        series: [
          {},
          { label: "all errors %", stroke: "#cf222e", fill: "rgba(207,34,46,.08)", width: 2, value: (u, v) => (v == null ? "–" : `${v.toFixed(2)}%`) },
          { label: "infrastructure %", stroke: "#8250df", width: 2, value: (u, v) => (v == null ? "–" : `${v.toFixed(2)}%`) },
        ],
        axes: [{}, { values: (u, values) => values.map((v) => `${v}%`), size: 60 }],
      },
      [times, pct(which.error_rate), pct(which.infrastructure_error_rate)],
      errorEl,
    ),
  );
}

// -- view: workflows and executions --------------------------------------------------------

const workflowCache = new Map(); // "name@version" -> workflow

async function workflowOf(name, version = 0) {
  const key = `${name}@${version}`;
  if (!workflowCache.has(key)) {
    const found = await api(`/workflows/${encodeURIComponent(name)}${version ? `?version=${version}` : ""}`);
    workflowCache.set(key, found.workflow);
  }
  return workflowCache.get(key);
}

/** An SVG drawing of a workflow's steps, layered by the depth of their depends_on. */
function stepGraph(workflow, states = {}) {
  const steps = workflow.steps || [];
  const byName = new Map(steps.map((step) => [step.name, step]));
  const depth = new Map();
  const depthOf = (name, seen = new Set()) => {
    if (depth.has(name)) return depth.get(name);
    if (seen.has(name)) return 0; // a cycle cannot be stored; be safe anyway
    seen.add(name);
    const deps = (byName.get(name)?.depends_on || []).filter((d) => byName.has(d));
    const value = deps.length ? 1 + Math.max(...deps.map((d) => depthOf(d, seen))) : 0;
    depth.set(name, value);
    return value;
  };
  const layers = [];
  for (const step of steps) {
    const d = depthOf(step.name);
    (layers[d] ||= []).push(step);
  }
  const W = 210;
  const H = 52;
  const GX = 60;
  const GY = 18;
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  const width = layers.length * (W + GX) - GX + 20;
  const height = tallest * (H + GY) - GY + 20;
  const at = new Map();
  layers.forEach((layer, i) => {
    const offset = ((tallest - layer.length) * (H + GY)) / 2;
    layer.forEach((step, j) => at.set(step.name, { x: 10 + i * (W + GX), y: 10 + offset + j * (H + GY) }));
  });
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `steps of ${workflow.name || "workflow"}` });
  svg.append(
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" }, s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8c959f" }))),
  );
  for (const step of steps) {
    for (const dep of step.depends_on || []) {
      const a = at.get(dep);
      const b = at.get(step.name);
      if (!a || !b) continue;
      const x1 = a.x + W;
      const y1 = a.y + H / 2;
      const x2 = b.x;
      const y2 = b.y + H / 2;
      const mid = (x1 + x2) / 2;
      svg.append(s("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }));
    }
  }
  for (const step of steps) {
    const { x, y } = at.get(step.name);
    const state = states[step.name] || "";
    const node = s("g", { class: "node", transform: `translate(${x},${y})`, dataset: { step: step.name, state } });
    const title = s("title");
    title.textContent = `${step.name}: ${step.service}.${step.operation || step.name}${state ? ` (${state})` : ""}`;
    const name = s("text", { x: 10, y: 18 });
    name.textContent = clip(step.name + (step.required === false ? " (optional)" : ""), state ? 18 : 30);
    const sub = s("text", { x: 10, y: 33, class: "sub" });
    sub.textContent = clip(`${step.service} · ${step.operation || step.name}`, 32);
    node.append(title, s("rect", { width: W, height: H, rx: 6 }), name, sub);
    if (state) {
      const badge = s("text", { x: W - 8, y: 18, class: `sub state-${state}`, "text-anchor": "end" });
      badge.textContent = state.toLowerCase().replace("_", " ");
      node.append(badge);
    }
    if (step.compensation && (step.compensation.operation || step.compensation.service)) {
      const comp = s("text", { x: 10, y: 46, class: "comp" });
      comp.textContent = clip(`↺ ${step.compensation.operation}`, 32);
      node.append(comp);
    }
    svg.append(node);
  }
  return h("div", { class: "graph" }, svg);
}

const workflowsState = { name: "", stateFilter: "", timer: null };

async function renderWorkflows(name) {
  workflowsState.name = name || "";
  const view = document.getElementById("view-workflows");
  let workflows = [];
  try {
    workflows = (await api("/workflows?page_size=1000")).workflows;
  } catch (error) {
    view.replaceChildren(h("h2", {}, "Workflows"), h("div", { class: "empty" }, error.message));
    return;
  }
  const list = h(
    "ul",
    { class: "list card", id: "workflow-list" },
    h("li", {}, h("a", { href: "#/workflows", class: workflowsState.name ? "" : "active" }, "All executions")),
    workflows.map((w) =>
      h("li", {}, h("a", { href: `#/workflows/${encodeURIComponent(w.name)}`, class: w.name === workflowsState.name ? "active" : "" }, w.name)),
    ),
  );
  const main = h("div", { id: "workflow-main" });
  view.replaceChildren(h("h2", {}, "Workflows"), h("div", { class: "split" }, list, main));
  const selected = workflows.find((w) => w.name === workflowsState.name);
  if (workflowsState.name && !selected) {
    main.append(h("div", { class: "empty" }, `No workflow named ${workflowsState.name}.`));
    return;
  }
  if (selected) {
    workflowCache.set(`${selected.name}@${selected.version}`, selected);
    main.append(
      h(
        "div",
        { class: "card" },
        h("header", {}, h("h3", {}, selected.name), h("span", { class: "muted" }, `version ${selected.version}`), h("span", { class: "muted" }, selected.description || "")),
        h("div", { class: "body" }, stepGraph(selected)),
      ),
    );
  }
  const filter = h(
    "select",
    {
      id: "execution-state",
      onchange: (e) => {
        workflowsState.stateFilter = e.target.value;
        loadExecutions();
      },
    },
    ["", "running", "succeeded", "failed", "compensating", "compensated", "compensation_failed", "cancelled", "pending"].map((v) =>
      h("option", { value: v, selected: v === workflowsState.stateFilter }, v ? v.replace("_", " ") : "any state"),
    ),
  );
  main.append(
    h(
      "div",
      { class: "card" },
      h("header", {}, h("h3", {}, "Executions"), h("span", { style: "flex:1" }), h("label", {}, "State ", filter)),
      h("div", { class: "body", id: "executions" }, h("span", { class: "muted" }, "Loading…")),
    ),
  );
  await loadExecutions();
}

async function loadExecutions() {
  const box = document.getElementById("executions");
  if (!box) return;
  const params = new URLSearchParams({ page_size: "50" });
  if (workflowsState.name) params.set("workflow", workflowsState.name);
  if (workflowsState.stateFilter) params.set("state", workflowsState.stateFilter);
  let executions;
  try {
    executions = (await api(`/executions?${params}`)).executions;
  } catch (error) {
    box.replaceChildren(h("span", { class: "muted" }, error.message));
    return;
  }
  if (!executions.length) {
    box.replaceChildren(h("span", { class: "muted" }, "No execution."));
    return;
  }
  const rows = executions.map((x) => {
    const state = short(x.state, "EXECUTION_STATE_");
    const started = parseTime(x.start_time || x.create_time);
    const ended = parseTime(x.end_time);
    return h(
      "tr",
      { dataset: { execution: x.execution_id } },
      h("td", { class: "mono" }, h("a", { href: `#/executions/${encodeURIComponent(x.execution_id)}` }, x.execution_id)),
      h("td", {}, x.workflow_name || "(inline)"),
      h("td", {}, h("span", { class: `state state-${state}` }, state)),
      h("td", {}, fmtClock(started)),
      h("td", { class: "num" }, started ? fmtSpan(((ended || Date.now()) - started) / 1000) : "–"),
      h("td", {}, x.failed_step || ""),
    );
  });
  const head = ["Execution", "Workflow", "State", "Started", "Duration", "Failed step"].map((t) => h("th", { class: t === "Duration" ? "num" : "" }, t));
  box.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, head)), h("tbody", {}, rows)));
}

// -- view: one execution, live -------------------------------------------------------------

/** Event types that end a step's last attempt, and how the attempt is drawn. */
const STEP_END = {
  STEP_SUCCEEDED: "ok",
  STEP_FAILED: "failed",
  STEP_SKIPPED: "skipped",
  STEP_CANCELLED: "failed",
};

/** The execution being shown, folded from its events as they arrive. */
/** States an execution can be retried from (RetryExecution). */
const RETRYABLE = new Set(["FAILED", "COMPENSATION_FAILED", "CANCELLED"]);

class ExecutionView {
  constructor(id) {
    this.id = id;
    this.execution = null;
    this.workflow = null;
    this.events = [];
    this.lastIndex = 0;
    this.source = null;
    this.tick = null;
    this.closed = false;
    this.allowed = { cancel_execution: false, retry_execution: false };
  }

  async open() {
    const found = await api(`/executions/${encodeURIComponent(this.id)}?include_events=true`);
    this.execution = found.execution;
    for (const event of found.events) this.add(event);
    if (this.execution.workflow_name) {
      this.workflow = await workflowOf(this.execution.workflow_name, Number(this.execution.workflow_version)).catch(() => null);
    }
    const [cancel, retry] = await Promise.all([mayDo("cancel_execution"), mayDo("retry_execution")]);
    this.allowed = { cancel_execution: cancel, retry_execution: retry };
    this.render();
    if (!this.ended()) this.follow();
  }

  ended() {
    const state = short(this.execution.state, "EXECUTION_STATE_");
    return !["PENDING", "RUNNING", "COMPENSATING", "UNSPECIFIED", ""].includes(state);
  }

  follow() {
    const source = new EventSource(`${API}/events/executions/${encodeURIComponent(this.id)}?after_index=${this.lastIndex}`);
    this.source = source;
    source.addEventListener("event", (e) => {
      this.add(JSON.parse(e.data));
      this.render();
    });
    source.addEventListener("end", (e) => {
      this.execution = JSON.parse(e.data);
      source.close();
      this.render();
    });
    source.addEventListener("stream_error", (e) => {
      banner(`execution stream: ${JSON.parse(e.data).error.message}`);
    });
    this.tick = setInterval(() => this.renderTimeline(), 500);
  }

  close() {
    this.closed = true;
    if (this.source) this.source.close();
    clearInterval(this.tick);
  }

  add(event) {
    const index = Number(event.index);
    if (index <= this.lastIndex) return;
    this.lastIndex = index;
    this.events.push(event);
    const x = this.execution;
    const executionState = short(event.execution_state, "EXECUTION_STATE_");
    if (executionState && executionState !== "UNSPECIFIED") x.state = event.execution_state;
    const stepState = event.step_state && short(event.step_state, "STEP_STATE_");
    if (event.step_name && stepState && stepState !== "UNSPECIFIED") {
      const step = x.steps.find((st) => st.step_name === event.step_name);
      if (step) step.state = event.step_state;
    }
    if (event.step_name && event.output && short(event.type, "EXECUTION_EVENT_TYPE_") === "STEP_SUCCEEDED") {
      x.output = { ...(x.output || {}), [event.step_name]: event.output }; // as it happens
    }
  }

  stepStates() {
    return Object.fromEntries(this.execution.steps.map((st) => [st.step_name, short(st.state, "STEP_STATE_")]));
  }

  /** Per step: attempts [{start, end, kind}], retry marks, compensation {start, end, kind}. */
  spans() {
    const out = new Map(this.execution.steps.map((st) => [st.step_name, { attempts: [], marks: [], comp: null }]));
    for (const event of this.events) {
      const span = out.get(event.step_name);
      if (!span) continue;
      const t = parseTime(event.time);
      const type = short(event.type, "EXECUTION_EVENT_TYPE_");
      const open = span.attempts[span.attempts.length - 1];
      if (type === "STEP_STARTED") span.attempts.push({ start: t, end: null, kind: "running", attempt: event.attempt, instance: event.instance_id || "" });
      else if (type === "STEP_RETRYING") {
        if (open && open.end === null) Object.assign(open, { end: t, kind: "retry" });
        span.marks.push({ t, text: `attempt ${event.attempt} failed: ${event.error?.message || event.message || ""}; retrying in ${fmtSpan(durationSeconds(event.backoff))}` });
      } else if (type in STEP_END) {
        if (open && open.end === null) Object.assign(open, { end: t, kind: STEP_END[type] });
      } else if (type === "COMPENSATION_STARTED") span.comp = { start: t, end: null, kind: "running" };
      else if (type === "COMPENSATION_SUCCEEDED" || type === "COMPENSATION_FAILED") {
        if (span.comp) Object.assign(span.comp, { end: t, kind: type.endsWith("FAILED") ? "failed" : "ok" });
      }
    }
    return out;
  }

  range() {
    const x = this.execution;
    const first = parseTime(x.start_time) || parseTime(x.create_time) || parseTime(this.events[0]?.time) || Date.now();
    const last = this.ended() ? parseTime(x.end_time) || parseTime(this.events[this.events.length - 1]?.time) || Date.now() : Date.now();
    return [first, Math.max(last, first + 1000)];
  }

  render() {
    if (this.closed) return;
    const view = document.getElementById("view-workflows");
    const x = this.execution;
    const state = short(x.state, "EXECUTION_STATE_");
    const workflow = this.workflow || { name: x.workflow_name, steps: x.steps.map((st) => ({ name: st.step_name, service: "", operation: "" })) };
    const started = parseTime(x.start_time || x.create_time);
    const ended = parseTime(x.end_time);
    // The buttons survive a render in the same state (a reason being typed stays).
    const previous = document.getElementById("execution-actions");
    const actions = previous && this.actionsFor === state ? previous : this.actions(state);
    this.actionsFor = state;
    view.replaceChildren(
      h("h2", {}, h("a", { href: x.workflow_name ? `#/workflows/${encodeURIComponent(x.workflow_name)}` : "#/workflows" }, "Workflows"), " / ", h("span", { class: "mono" }, x.execution_id)),
      h(
        "div",
        { class: "card", id: "execution", dataset: { state } },
        h(
          "header",
          {},
          h("h3", {}, x.workflow_name || "(inline workflow)"),
          h("span", { class: `state state-${state}`, id: "execution-state" }, state),
          h("span", { style: "flex:1" }),
          actions,
        ),
        h(
          "div",
          { class: "body" },
          h(
            "dl",
            { class: "meta" },
            h("dt", {}, "Version"), h("dd", {}, String(x.workflow_version)),
            h("dt", {}, "Correlation id"), h("dd", { class: "mono" }, x.correlation_id || "–"),
            h("dt", {}, "Started"), h("dd", {}, started ? new Date(started).toLocaleString() : "–"),
            h("dt", {}, "Duration"), h("dd", { id: "execution-duration" }, started ? fmtSpan(((ended || Date.now()) - started) / 1000) : "–"),
            x.retry_of ? h("dt", {}, "Retry of") : null,
            x.retry_of ? h("dd", { id: "retry-of" }, h("a", { class: "mono", href: `#/executions/${encodeURIComponent(x.retry_of)}` }, x.retry_of)) : null,
            x.retried_by ? h("dt", {}, "Retried by") : null,
            x.retried_by ? h("dd", { id: "retried-by" }, h("a", { class: "mono", href: `#/executions/${encodeURIComponent(x.retried_by)}` }, x.retried_by)) : null,
            x.error?.message ? h("dt", {}, "Error") : null,
            x.error?.message ? h("dd", {}, `${x.failed_step ? `${x.failed_step}: ` : ""}${x.error.message}`) : null,
          ),
        ),
      ),
      h("div", { class: "card" }, h("header", {}, h("h3", {}, "Steps")), h("div", { class: "body", id: "execution-graph" }, stepGraph(workflow, this.stepStates()))),
      h(
        "div",
        { class: "card" },
        h("header", {}, h("h3", {}, "Input and output")),
        h(
          "div",
          { class: "body io" },
          h("h4", {}, "Input"),
          h("pre", { class: "mono", id: "execution-input" }, JSON.stringify(x.input || {}, null, 2)),
          h("h4", {}, "Output (each step's, so far)"),
          h("pre", { class: "mono", id: "execution-output" }, JSON.stringify(x.output || {}, null, 2)),
        ),
      ),
      h("div", { class: "card" }, h("header", {}, h("h3", {}, "Timeline"), h("span", { class: "muted" }, "attempts, retries (orange), compensation (purple)")), h("div", { class: "body timeline", id: "timeline" })),
      h("div", { class: "card" }, h("header", {}, h("h3", {}, "Events")), h("div", { class: "body", id: "event-log" })),
    );
    this.renderTimeline();
    this.renderLog();
    if (this.ended()) clearInterval(this.tick);
  }

  /** Cancel on a running execution, Retry on one that failed or was cancelled: each
   * only when the token's scope allows its RPC. */
  actions(state) {
    const box = h("span", { class: "actions", id: "execution-actions" });
    if (!this.ended() && this.allowed.cancel_execution) {
      const reason = h("input", { type: "text", id: "cancel-reason", placeholder: "reason (optional)", maxlength: "1024" });
      const confirm = h("button", { type: "button", id: "cancel-confirm", class: "danger" }, "Cancel execution");
      const form = h("span", { class: "confirm", hidden: true }, reason, confirm);
      const open = h("button", { type: "button", id: "cancel-button", class: "quiet" }, "Cancel…");
      open.addEventListener("click", () => {
        form.hidden = false;
        open.hidden = true;
        reason.focus();
      });
      confirm.addEventListener("click", async () => {
        confirm.disabled = true;
        try {
          const answer = await post(`/executions/${encodeURIComponent(this.id)}/cancel`, { reason: reason.value.trim() });
          if (answer?.execution) this.execution.state = answer.execution.state;
          banner("");
        } catch (error) {
          banner(`cancel: ${error.message}`);
        }
        this.render();
      });
      box.append(open, form);
    }
    if (RETRYABLE.has(state) && !this.execution.retried_by && this.allowed.retry_execution) {
      const retry = h("button", { type: "button", id: "retry-button" }, "Retry");
      retry.addEventListener("click", async () => {
        retry.disabled = true;
        try {
          const answer = await post(`/executions/${encodeURIComponent(this.id)}/retry`, {});
          location.hash = `#/executions/${encodeURIComponent(answer.execution.execution_id)}`;
        } catch (error) {
          banner(`retry: ${error.message}`);
          retry.disabled = false;
        }
      });
      box.append(retry);
    }
    return box;
  }

  renderTimeline() {
    const box = document.getElementById("timeline");
    if (!box || this.closed) return;
    const [t0, t1] = this.range();
    const span = t1 - t0;
    const pct = (t) => `${(((t - t0) / span) * 100).toFixed(2)}%`;
    const width = (a, b) => `${Math.max(0.3, ((b - a) / span) * 100).toFixed(2)}%`;
    const now = Date.now();
    const spans = this.spans();
    const axis = h("div", { class: "tl-axis" }, [0, 0.25, 0.5, 0.75, 1].map((f) => h("span", {}, fmtSpan((span * f) / 1000))));
    const rows = this.execution.steps.map((st) => {
      const state = short(st.state, "STEP_STATE_");
      const info = spans.get(st.step_name);
      const bars = [];
      for (const a of info.attempts) {
        const end = a.end ?? (this.ended() ? t1 : now);
        const where = a.instance ? ` on ${a.instance}` : "";
        bars.push(h("div", { class: `tl-bar ${a.kind}`, style: `left:${pct(a.start)};width:${width(a.start, end)}`, dataset: { instance: a.instance }, title: `attempt ${a.attempt}${where}: ${fmtSpan((end - a.start) / 1000)}` }));
      }
      for (const m of info.marks) bars.push(h("div", { class: "tl-mark", style: `left:${pct(m.t)}`, title: m.text }));
      if (info.comp) {
        const end = info.comp.end ?? (this.ended() ? t1 : now);
        bars.push(h("div", { class: `tl-bar comp ${info.comp.kind}`, style: `left:${pct(info.comp.start)};width:${width(info.comp.start, end)}`, title: `compensation: ${info.comp.kind}` }));
      }
      const attempts = Number(st.attempts || info.attempts.length || 0);
      return h(
        "div",
        { class: "tl-row", dataset: { step: st.step_name, state } },
        h(
          "div",
          { class: "tl-label" },
          h("span", { class: "name" }, st.step_name),
          h("span", {}, h("span", { class: `state tl-state state-${state}` }, state), attempts > 1 ? h("span", { class: "muted" }, ` · ${attempts} attempts`) : null),
        ),
        h("div", { class: "tl-track" }, bars),
      );
    });
    box.replaceChildren(axis, ...rows);
    const duration = document.getElementById("execution-duration");
    const started = parseTime(this.execution.start_time || this.execution.create_time);
    const ended = parseTime(this.execution.end_time);
    if (duration && started) duration.textContent = fmtSpan(((ended || now) - started) / 1000);
  }

  renderLog() {
    const box = document.getElementById("event-log");
    if (!box) return;
    const [t0] = this.range();
    const rows = this.events.map((e) =>
      h(
        "tr",
        {},
        h("td", { class: "num when" }, `+${fmtSpan((parseTime(e.time) - t0) / 1000)}`),
        h("td", {}, short(e.type, "EXECUTION_EVENT_TYPE_").toLowerCase().replaceAll("_", " ")),
        h("td", {}, e.step_name || ""),
        h("td", { class: "num" }, e.attempt ? String(e.attempt) : ""),
        h("td", { class: "mono instance" }, e.instance_id || ""),
        h("td", {}, e.error?.message || e.message || ""),
      ),
    );
    const head = h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { class: "num" }, "Time"),
        h("th", {}, "Event"),
        h("th", {}, "Step"),
        h("th", { class: "num" }, "Attempt"),
        h("th", {}, "Instance"),
        h("th", {}, "Detail"),
      ),
    );
    box.replaceChildren(h("table", { class: "events" }, head, h("tbody", {}, rows)));
  }
}

// -- routing -----------------------------------------------------------------------------

let current = { view: "", execution: null, timer: null };

function show(view) {
  for (const el of document.querySelectorAll(".view")) el.hidden = el.id !== `view-${view}`;
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === view);
}

/** #/services, #/metrics[/service], #/workflows[/name], #/executions/id, #/status, #/xds */
async function route() {
  const [, view = "services", arg = ""] = location.hash.split("/").map(decodeURIComponent);
  if (current.execution) current.execution.close();
  clearInterval(current.timer);
  current = { view, execution: null, timer: null };
  banner("");
  if (view === "metrics") {
    show("metrics");
    destroyCharts();
    await renderMetrics(arg);
    current.timer = setInterval(() => document.hidden || loadMetrics(), 10_000);
  } else if (view === "workflows") {
    show("workflows");
    await renderWorkflows(arg);
    current.timer = setInterval(() => document.hidden || loadExecutions(), 5_000);
  } else if (view === "status") {
    show("status");
    await renderStatus();
    current.timer = setInterval(() => document.hidden || renderStatus(), 5_000);
  } else if (view === "xds") {
    show("xds");
    await renderXds();
    current.timer = setInterval(() => document.hidden || renderXds(), 5_000);
  } else if (view === "executions" && arg) {
    show("workflows");
    const execution = new ExecutionView(arg);
    current.execution = execution;
    try {
      await execution.open();
    } catch (error) {
      document.getElementById("view-workflows").replaceChildren(h("h2", {}, "Execution"), h("div", { class: "empty" }, error.message));
    }
  } else {
    show("services");
    renderServices();
    current.timer = setInterval(tickServices, 1_000);
  }
}

let pending = false;
registry.listeners.add(() => {
  if (current.view === "metrics") {
    // Services may register after the page opened: offer them.
    const select = document.getElementById("metrics-service");
    const offered = new Set(select ? [...select.options].map((o) => o.value) : []);
    if (select && registry.services().some((n) => !offered.has(n))) renderMetrics(metricsState.service);
    return;
  }
  if (current.view !== "services" || pending) return;
  pending = true; // many changes in one frame: one render
  requestAnimationFrame(() => {
    pending = false;
    renderServices();
  });
});

setupToken();
registry.connect();
window.addEventListener("hashchange", route);
route();
