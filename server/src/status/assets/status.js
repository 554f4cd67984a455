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
    text("r-barriers", String(o.barriers));
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
  // Cells of a backend row (the order of page.rs's `row`).
  const ID = 0, ADDR = 1, ZONE = 2, WEIGHT = 3, STATE = 4, REASON = 5, PROBE = 6, INFLIGHT = 7,
    RATES = 8, TREND = 9, CIRCUITS = 10, SOURCE = 11, META = 12;
  // As page.rs's `source`: a live update carries no lease age (it changes every second), so
  // the age shown at load (the cell's data-age) is kept.
  function sourceText(td, b) {
    if (b.lease_age_seconds !== undefined) td.dataset.age = String(b.lease_age_seconds);
    let t = b.source;
    if (b.lease_ttl_seconds) {
      t += " " + (td.dataset.age !== undefined ? td.dataset.age + "s/" : "") + b.lease_ttl_seconds + "s";
    }
    if (b.dns_name) t += " " + b.dns_name;
    return t;
  }
  function backendRow(tr, b) {
    set(tr, ID, b.id);
    set(tr, ADDR, b.address);
    set(tr, ZONE, (b.zone ? b.zone + " " : "") + "p" + b.priority);
    set(tr, WEIGHT, String(b.weight) + (b.effective_weight !== b.weight ? "\u2192" + b.effective_weight : ""));
    const st = b.eligible ? ["ok", "eligible"] : b.health === "unhealthy" ? ["bad", "unhealthy"] : ["warn", "draining"];
    set(tr, STATE, st[1], st[0]);
    set(tr, REASON, b.reason);
    set(tr, PROBE, (b.probe || "") + (b.probe_rtt_us !== undefined ? " " + Math.floor(b.probe_rtt_us / 1000) + "ms" : ""));
    set(tr, INFLIGHT, String(b.in_flight));
    ratesCell(tr, b.requests_per_s, b.errors_per_s);
    cell(tr, TREND);
    const c = b.circuit_open + b.circuit_half_open;
    set(tr, CIRCUITS, c > 0 ? b.circuit_open + "/" + b.circuit_half_open : "");
    set(tr, SOURCE, sourceText(cell(tr, SOURCE), b));
    set(tr, META, Object.entries(b.metadata).map(([k, v]) => k + "=" + v + " ").join(""));
  }
  function ratesCell(tr, r, e) {
    set(tr, RATES, rate(r) + (e > 0 ? " / " + rate(e) : ""));
  }
  function spark(tr, values) {
    const td = cell(tr, TREND);
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
  // As page.rs's `follower`.
  function followers(list) {
    const tbody = document.querySelector("#followers tbody");
    tbody.replaceChildren();
    for (const f of list) {
      const tr = tbody.insertRow();
      if (f.lagging) tr.className = "bad";
      const state = f.lagging ? "lagging" : f.behind_ms !== undefined ? "behind" : "in step";
      [f.kind, f.protocol, String(f.stream), f.client_id, f.peer, String(f.acked_version),
        f.behind_ms !== undefined ? f.behind_ms + " ms" : "", state]
        .forEach((t, i) => set(tr, i, t));
    }
  }
  // As page.rs's `barrier`: the drain barriers in progress (the whole list when it changed).
  function barriers(list) {
    const tbody = document.querySelector("#barriers tbody");
    tbody.replaceChildren();
    for (const b of list) {
      const tr = tbody.insertRow();
      if (b.pending_total > 0) tr.className = "warn";
      const ms = b.deadline_in_ms;
      [b.server_id,
        b.kind + " v" + b.version + " acked" + (b.in_flight_zero ? " + in-flight 0" : ""),
        b.confirmed + " / " + b.pending_total + " / " + b.stalled,
        String(b.in_flight),
        Math.floor(ms / 1000) + "." + Math.floor(ms % 1000 / 100) + " s"]
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
    if (c.barriers) barriers(c.barriers);
  }
  function rates(r) {
    const rows = rowsById(document.querySelector("#backends tbody"));
    // Rows whose in-flight, probe or circuit columns moved (no version change).
    for (const b of r.upsert || []) { const tr = rows.get(b.id); if (tr) backendRow(tr, b); }
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
    if (r.barriers) barriers(r.barriers);
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
