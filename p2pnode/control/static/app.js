// The status page: renders the node's state pushed over Server-Sent Events.
// No framework, no build step. Nothing here ever sees the API token.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function size(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function ago(t, now) {
  if (!t) return "never";
  const s = Math.max(0, Math.round(now - t));
  return s < 60 ? s + " s ago" : Math.round(s / 60) + " min ago";
}

function fillRows(table, rows) {
  const body = $(table + " tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node ? wrapTd(c) : el("td", c));
    return tr;
  }));
}

function wrapTd(node) { const td = el("td"); td.append(node); return td; }

function renderIdentity(s) {
  const id = s.identity, st = s.status;
  const rows = [
    ["peer id", id.peer_id], ["version", id.version], ["state", st.state],
    ["uptime", Math.round(st.uptime) + " s"], ["joined", st.joined ? "yes" : "not yet"],
    ["reachable", st.reachable], ["addresses", (id.addresses || []).join(", ")],
    ["join with", (id.join_addresses || []).join(", ") || "n/a"],
    ["peers", st.routing_table_size + " in the routing table, " + st.connected + " connected"],
    ["memory", size(st.rss_bytes) + " RSS"],
  ];
  $("#identity").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
}

function renderDownloads(s) {
  fillRows("#downloads", s.downloads.map((d) => {
    const bar = el("progress");
    bar.max = d.total_bytes || 1;
    bar.value = d.state === "done" ? bar.max : (d.done_bytes || 0);
    bar.dataset.id = d.id;
    const pct = d.total_bytes ? Math.floor((100 * bar.value) / bar.max) : 0;
    bar.title = pct + "%";
    const label = el("span", " " + pct + "%", "pct");
    const cell = el("span"); cell.append(bar, label);
    return [el("span", (d.name || d.id.slice(0, 16) + "…")), cell,
      d.error ? d.state + ": " + d.error : (d.activity || d.state),
      d.rate !== undefined ? size(d.rate) + "/s" : "", d.peers_shown ?? d.peers ?? ""];
  }));
}

function renderTraffic(s) {
  const svg = $("#traffic"), pts = s.traffic;
  const max = Math.max(1, ...pts.flatMap((p) => [p.in, p.out, p.errors]));
  const line = (key, color) => {
    if (pts.length < 2) return "";
    const step = 300 / (pts.length - 1);
    const d = pts.map((p, i) => (i * step).toFixed(1) + "," + (58 - (56 * p[key]) / max).toFixed(1));
    return `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${d.join(" ")}"/>`;
  };
  svg.innerHTML = line("in", "#3f6fd8") + line("out", "#e07b00") + line("errors", "#c62828");
  const last = pts[pts.length - 1] || { in: 0, out: 0, errors: 0 };
  const legend = $("#traffic-legend");
  legend.replaceChildren(
    el("span", "in " + last.in, "in"), " · ", el("span", "out " + last.out, "out"), " · ",
    el("span", "errors " + last.errors, "err"),
    " per " + s.sample_interval + " s, last " + pts.length + " samples (max " + max + ")");
}

function renderBuckets(s) {
  const max = Math.max(1, ...s.buckets);
  $("#buckets").replaceChildren(...s.buckets.map((n, cpl) => {
    const bar = el("div");
    bar.style.height = Math.max(2, (60 * n) / max) + "px";
    bar.title = "prefix " + cpl + ": " + n + " contact(s)";
    bar.append(el("span", cpl));
    return bar;
  }));
  if (!s.buckets.length) $("#buckets").append(el("em", "empty"));
}

function render(s) {
  renderIdentity(s);
  renderDownloads(s);
  renderTraffic(s);
  renderBuckets(s);
  fillRows("#peers", s.peers.map((p) => [el("span", p.peer_id, "mono"), p.address,
    ago(p.last_seen, s.time), p.rtt_ms === null ? "n/a" : p.rtt_ms + " ms"]));
  fillRows("#resources", s.resources.map((r) => [el("span", r.id.slice(0, 20) + "…", "mono"),
    r.name, size(r.size), r.stale ? "stale" : r.state]));
  $("#errors").replaceChildren(...s.errors.map((e) => el("li",
    new Date(e.time * 1000).toLocaleTimeString() + " " + e.level + " " + e.logger + ": " + e.message)));
  if (!s.errors.length) $("#errors").append(el("li", "none"));
  $("#get-name").placeholder = "save as (in " + s.downloads_dir + ")";
}

let updates = 0;
function connect() {
  const source = new EventSource("/ui/events");
  const live = $("#live");
  source.onmessage = (ev) => {
    updates++;
    window.p2pnodeUpdates = updates;
    if (updates === 1) performance.mark("first-update");
    live.textContent = "live"; live.className = "badge ok";
    render(JSON.parse(ev.data));
  };
  source.onerror = () => {
    live.textContent = "disconnected (retrying)"; live.className = "badge down";
  };
}

$("#get-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#get-result");
  const body = { id: $("#get-id").value.trim(), name: $("#get-name").value.trim() };
  const r = await fetch("/ui/api/get", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body), credentials: "same-origin",
  });
  const answer = await r.json().catch(() => ({}));
  out.textContent = r.ok ? "started: " + body.name : "refused: " + (answer.error || r.status);
});

connect();
