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

async function api(path) {
  const r = await fetch(path, { headers: { "Authorization": "Bearer " + token() } });
  if (r.status === 401 || r.status === 403) { $("login").hidden = false; throw new Error("the admin token was not accepted"); }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

async function refresh() {
  if (!token()) { $("login").hidden = false; return; }
  try {
    const t = await api("/api/v1/tunnels");
    const body = $("tunnels"); body.replaceChildren();
    for (const x of t.tunnels) {
      const row = document.createElement("tr");
      cell(row, x.name); cell(row, tags(x.tags), "wrap"); cell(row, x.address); cell(row, when(x.connected_since));
      const st = cell(row, x.status); st.className = x.status;
      cell(row, x.active_streams); cell(row, bytes(x.bytes_to_agent)); cell(row, bytes(x.bytes_from_agent));
      cell(row, x.rtt_ms == null ? "" : x.rtt_ms.toFixed(2) + " ms"); cell(row, x.tls || "off"); cell(row, x.agent_version);
      cell(row, x.token_id);
      body.appendChild(row);
    }
    $("no-tunnels").hidden = t.tunnels.length > 0;
    $("tunnel-count").textContent = t.tunnels.length + " connected to " + t.server;
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
$("filter-agent").addEventListener("change", () => { offset = 0; refresh(); });
$("filter-kind").addEventListener("change", () => { offset = 0; refresh(); });
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
$("next").addEventListener("click", () => { if (offset + PAGE < total) { offset += PAGE; refresh(); } });
refresh();
setInterval(refresh, 3000);
