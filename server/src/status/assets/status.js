// dlbd status page: follows the server-sent events of /api/events and updates the page in
// place. Only textContent is ever set from data (never parsed as HTML): strings from the server
// (backend ids, metadata, reasons) cannot become markup.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;
  const service = body.dataset.service;
  const live = document.getElementById("live");
  const POINTS = 60;
  const trends = new Map();

  function rate(v) {
    if (v === 0) return "0";
    return v < 10 ? v.toFixed(1) : v.toFixed(0);
  }
  function cell(tr, i) {
    while (tr.cells.length <= i) tr.insertCell();
    return tr.cells[i];
  }
  function set(tr, i, text, cls) {
    const td = cell(tr, i);
    if (td.textContent !== text) td.textContent = text;
    if (cls !== undefined) td.className = cls;
  }
  function summaryCells(tr, s, from) {
    set(tr, from, String(s.backends.total));
    set(tr, from + 1, String(s.backends.eligible));
    set(tr, from + 2, String(s.backends.unhealthy), s.backends.unhealthy > 0 ? "bad" : "");
    set(tr, from + 3, String(s.backends.draining));
    set(tr, from + 4, rate(s.requests_per_s));
    set(tr, from + 5, s.requests_per_s > 0
      ? (100 * s.errors_per_s / s.requests_per_s).toFixed(1) + " %" : "\u2013");
    set(tr, from + 6, String(s.in_flight));
    set(tr, from + 7, (s.panic.active ? "PANIC " : "") + s.panic.mode, s.panic.active ? "bad" : "");
  }
  // Overview rows carry data-id; backend rows are found by their first cell (the id).
  function rowsById(tbody) {
    const m = new Map();
    for (const tr of tbody.rows) m.set(tr.dataset.id ?? tr.cells[0].textContent, tr);
    return m;
  }

  // ---- the overview ----
  function overview(o) {
    const text = (id, t) => { const e = document.getElementById(id); if (e) e.textContent = t; };
    text("r-id", o.replica.id);
    text("r-role", o.replica.leader ? "leader" : "follower");
    text("r-ready", o.replica.readiness);
    text("r-members", o.replica.members.join(", "));
    text("r-store", o.store.kind + " \u00b7 epoch " + o.store.epoch + " \u00b7 revision " + o.store.revision);
    text("r-sessions", String(o.sessions));
    text("r-xds", String(o.xds_clients));
    const tbody = document.querySelector("#services tbody");
    const rows = rowsById(tbody);
    const keep = new Set();
    for (const s of o.services) {
      keep.add(s.name);
      let tr = rows.get(s.name);
      if (!tr) {
        tr = tbody.insertRow();
        tr.dataset.id = s.name;
        const a = document.createElement("a");
        a.href = "/services/" + encodeURIComponent(s.name);
        a.textContent = s.name;
        cell(tr, 0).appendChild(a);
      }
      summaryCells(tr, s, 1);
    }
    for (const [name, tr] of rows) if (!keep.has(name)) tr.remove();
  }

  // ---- a service ----
  function backendRow(tr, b) {
    set(tr, 0, b.id);
    set(tr, 1, b.address + (b.zone ? " " + b.zone : ""));
    set(tr, 2, String(b.weight) + (b.effective_weight !== b.weight ? "\u2192" + b.effective_weight : ""));
    const st = b.eligible ? ["ok", "eligible"] : b.health === "unhealthy" ? ["bad", "unhealthy"] : ["warn", "draining"];
    set(tr, 3, st[1], st[0]);
    set(tr, 4, b.reason);
    set(tr, 5, (b.probe || "") + (b.probe_rtt_us !== undefined ? " " + Math.floor(b.probe_rtt_us / 1000) + "ms" : ""));
    set(tr, 6, String(b.in_flight));
    ratesCell(tr, b.requests_per_s, b.errors_per_s);
    cell(tr, 8);
    const c = b.circuit_open + b.circuit_half_open;
    set(tr, 9, c > 0 ? b.circuit_open + "/" + b.circuit_half_open : "");
    set(tr, 10, b.source + (b.lease_ttl_seconds ? " " + b.lease_ttl_seconds + "s" : "") + (b.dns_name ? " " + b.dns_name : ""));
    set(tr, 11, Object.entries(b.metadata).filter(([k]) => k !== "zone").map(([k, v]) => k + "=" + v + " ").join(""));
  }
  function ratesCell(tr, r, e) {
    set(tr, 7, rate(r) + (e > 0 ? " / " + rate(e) : ""));
  }
  function spark(tr, values) {
    const td = cell(tr, 8);
    const NS = "http://www.w3.org/2000/svg";
    let svg = td.firstChild;
    if (!svg) {
      svg = document.createElementNS(NS, "svg");
      svg.setAttribute("width", "120");
      svg.setAttribute("height", "18");
      svg.appendChild(document.createElementNS(NS, "polyline"));
      td.appendChild(svg);
    }
    const max = Math.max(1, ...values);
    const pts = values.map((v, i) => (i * 120 / (POINTS - 1)).toFixed(1) + "," + (17 - 16 * v / max).toFixed(1));
    svg.firstChild.setAttribute("points", pts.join(" "));
  }
  function push(id, value) {
    let t = trends.get(id);
    if (!t) { t = new Array(POINTS).fill(0); trends.set(id, t); }
    t.push(value);
    while (t.length > POINTS) t.shift();
    return t;
  }
  function followers(list) {
    const tbody = document.querySelector("#followers tbody");
    tbody.replaceChildren();
    for (const f of list) {
      const tr = tbody.insertRow();
      if (f.lagging) tr.className = "bad";
      [f.protocol, String(f.stream), f.node_id, f.peer, f.acked_version, f.lagging ? "lagging" : "in step"]
        .forEach((t, i) => set(tr, i, t));
    }
  }
  function summary(s) {
    const tr = document.querySelector("#summary tbody tr");
    set(tr, 0, String(s.version));
    summaryCells(tr, s, 2);
  }
  function change(c) {
    const tbody = document.querySelector("#backends tbody");
    const rows = rowsById(tbody);
    for (const b of c.upsert) {
      let tr = rows.get(b.id);
      if (!tr) {
        // Kept in id order, as the server renders them.
        tr = document.createElement("tr");
        let before = null;
        for (const r of tbody.rows) if (r.cells[0].textContent > b.id) { before = r; break; }
        tbody.insertBefore(tr, before);
      }
      backendRow(tr, b);
    }
    for (const id of c.remove) { const tr = rows.get(id); if (tr) tr.remove(); trends.delete(id); }
    summary(c.summary);
    if (c.followers) followers(c.followers);
  }
  function rates(r) {
    const rows = rowsById(document.querySelector("#backends tbody"));
    for (const [id, tr] of rows) {
      const v = r.backends[id];
      if (v) {
        ratesCell(tr, v[2], v[3]);
        spark(tr, push(id, v[0]));
      } else if (trends.has(id)) {
        ratesCell(tr, 0, 0);
        spark(tr, push(id, 0));
      }
    }
    summary(r.summary);
    if (r.followers) followers(r.followers);
  }
  function initial(t) {
    const rows = rowsById(document.querySelector("#backends tbody"));
    for (const [id, values] of Object.entries(t)) {
      const v = values.slice(-POINTS);
      trends.set(id, new Array(POINTS - v.length).fill(0).concat(v));
      const tr = rows.get(id);
      if (tr) spark(tr, trends.get(id));
    }
  }

  let url = "/api/events";
  if (page === "service") {
    url += "?service=" + encodeURIComponent(service) + "&version=" + body.dataset.version;
  }
  const es = new EventSource(url);
  es.onopen = () => { live.className = "on"; };
  es.onerror = () => { live.className = "off"; };
  const on = (name, f) => es.addEventListener(name, (e) => {
    f(JSON.parse(e.data));
    body.dataset.events = String(Number(body.dataset.events || 0) + 1);
  });
  on("overview", overview);
  on("service", change);
  on("rates", rates);
  on("trends", initial);
  es.addEventListener("gone", () => {
    live.className = "off";
    document.querySelector("h1").textContent += " (removed)";
    es.close();
  });
})();
