// The Reverse Tunnels page (page.html). A file served by NOVAS, so the page's
// Content-Security-Policy allows scripts from NOVAS only, none inline.
// Agent-supplied strings (names, tags, versions, details) only ever reach the
// page as textContent, never as markup.
"use strict";
const PAGE = 50;
let offset = 0, total = 0;
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("nova-admin-token") || ""; }
(function takeTokenFromFragment() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("nova-admin-token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
})();

function cell(row, content, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content == null ? "" : String(content);
  row.appendChild(td);
  return td;
}
function tags(obj) {
  const span = document.createElement("span");
  for (const [k, v] of Object.entries(obj || {})) {
    const t = document.createElement("span"); t.className = "tag"; t.textContent = k + "=" + v; span.appendChild(t);
  }
  return span;
}
function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function details(e) {
  const skip = new Set(["id", "kind", "time", "agent", "server"]);
  return Object.entries(e).filter(([k]) => !skip.has(k)).map(([k, v]) =>
    k + "=" + (typeof v === "object" ? JSON.stringify(v) : (k.startsWith("bytes") ? bytes(v) : v))).join("  ");
}

async function api(path, method, body) {
  const init = { method: method || "GET", headers: { "Authorization": "Bearer " + token() } };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const r = await fetch(path, init);
  if (r.status === 401 || r.status === 403) { $("login").hidden = false; throw new Error("the admin token was not accepted"); }
  if (!r.ok) {
    // The API says why in {"error": ...}: show that, not just the status.
    let why = "HTTP " + r.status;
    try { const e = await r.json(); if (e && e.error) why = e.error + " (HTTP " + r.status + ")"; } catch (_) { /* not JSON */ }
    throw new Error(why);
  }
  return r.json();
}

function button(label, onclick) {
  const b = document.createElement("button"); b.type = "button"; b.textContent = label;
  b.addEventListener("click", onclick);
  return b;
}

async function change(what, path, method, body) {
  $("route-error").textContent = "";
  try { await api(path, method, body); } catch (err) { $("route-error").textContent = what + ": " + err.message; }
  refresh();
}

function showCluster(sv, rt) {
  const stale = sv.stale_since;
  $("stale").hidden = !stale;
  $("stale").textContent = stale
    ? "The cluster view is stale since " + when(stale) + ": the cluster store (" + sv.store + ") cannot be reached"
      + (sv.error ? " (" + sv.error + ")" : "") + ". Tunnels and routes carry on; route changes wait for it."
    : "";
  const body = $("servers"); body.replaceChildren();
  for (const m of sv.servers) {
    const row = document.createElement("tr");
    cell(row, m.id + (m.this ? " (this server)" : "")); cell(row, m.address);
    cell(row, m.state, m.state === "alive" || m.state === "up" ? "connected" : "warn");
    cell(row, m.tunnels); cell(row, m.version); cell(row, when(m.started)); cell(row, when(m.heartbeat));
    body.appendChild(row);
  }
  $("server-count").textContent = sv.servers.length + " in the cluster (" + sv.store + ")";
  const rb = $("routes"); rb.replaceChildren();
  for (const r of rt.routes) {
    const row = document.createElement("tr"); row.dataset.id = r.id;
    cell(row, r.id); cell(row, r.route);
    cell(row, r.listening ? "on port " + r.port : (r.error || "no"), r.listening ? "" : "warn");
    if (r.agents > 0) cell(row, r.agents);
    else cell(row, "no matching agent in the cluster", "warn");
    cell(row, r.static ? "command line" : (r.created_by || "") + " " + when(r.created_at));
    cell(row, r.static ? "" : button("Remove", () => change("remove " + r.id, "/api/v1/routes/" + encodeURIComponent(r.id), "DELETE")));
    rb.appendChild(row);
  }
  $("no-routes").hidden = rt.routes.length > 0;
  $("route-count").textContent = rt.routes.length + " on " + rt.server;
}

async function refresh() {
  if (!token()) { $("login").hidden = false; return; }
  try {
    const t = await api("/api/v1/tunnels");
    const [sv, rt] = await Promise.all([api("/api/v1/servers"), api("/api/v1/routes")]);
    showCluster(sv, rt);
    const body = $("tunnels"); body.replaceChildren();
    for (const x of t.tunnels) {
      const row = document.createElement("tr");
      cell(row, x.name); cell(row, x.server); cell(row, tags(x.tags), "wrap"); cell(row, x.address); cell(row, when(x.connected_since));
      const st = cell(row, x.status); st.className = x.status;
      cell(row, x.active_streams); cell(row, bytes(x.bytes_to_agent)); cell(row, bytes(x.bytes_from_agent));
      cell(row, x.rtt_ms == null ? "" : x.rtt_ms.toFixed(2) + " ms"); cell(row, x.tls || (x.server === t.server ? "off" : "")); cell(row, x.agent_version);
      cell(row, x.token_id);
      // A drain is cluster-wide: every member drains its tunnel of the agent (docs/cluster.md).
      const drainable = x.status === "connected";
      cell(row, drainable ? button("Drain", () => change("drain " + x.name, "/api/v1/tunnels/" + encodeURIComponent(x.name) + "/drain", "POST")) : "");
      body.appendChild(row);
    }
    $("no-tunnels").hidden = t.tunnels.length > 0;
    $("tunnel-count").textContent = t.tunnels.length + " in the cluster; this page is served by " + t.server;
    const q = new URLSearchParams({ limit: PAGE, offset });
    if ($("filter-agent").value) q.set("agent", $("filter-agent").value);
    if ($("filter-kind").value) q.set("kind", $("filter-kind").value);
    const ev = await api("/api/v1/events?" + q);
    total = ev.total;
    const eb = $("events"); eb.replaceChildren();
    for (const e of ev.events) {
      const row = document.createElement("tr");
      cell(row, when(e.time)); cell(row, e.kind); cell(row, e.agent); cell(row, details(e), "wrap");
      eb.appendChild(row);
    }
    $("no-events").hidden = ev.events.length > 0;
    $("page").textContent = total ? (offset + 1) + "–" + Math.min(offset + PAGE, total) + " of " + total : "";
    $("error").textContent = ""; $("login").hidden = true;
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) { $("error").textContent = err.message; }
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault(); sessionStorage.setItem("nova-admin-token", $("token").value); $("token").value = ""; refresh();
});
$("route-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const spec = $("route-spec").value.trim();
  if (!spec) return;
  change("add route", "/api/v1/routes", "POST", { route: spec }).then(() => {
    if (!$("route-error").textContent) $("route-spec").value = "";
  });
});
$("filter-agent").addEventListener("change", () => { offset = 0; refresh(); });
$("filter-kind").addEventListener("change", () => { offset = 0; refresh(); });
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
$("next").addEventListener("click", () => { if (offset + PAGE < total) { offset += PAGE; refresh(); } });
refresh();
setInterval(refresh, 3000);
