// The live page: one WebSocket, the server pushes state (~3/s), images (when new) and the catalog.
"use strict";
(function () {
  const pending = new Map();  // the latest message of each type that came while the tab was hidden
  let socket = null, retry = 500, shownScan = null, finalShown = null;
  const images = new Map();  // key -> <img>

  function connection(text, cls) {
    const badge = document.getElementById("connection");
    badge.textContent = text; badge.className = "badge " + (cls || "");
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${proto}//${location.host}/ws`);
    socket.onopen = () => { retry = 500; connection("live", "ok"); };
    socket.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (document.hidden) { pending.set(msg.type, msg); return; }  // drawn when the tab shows again
      handle(msg);
    };
    socket.onclose = () => {
      connection("reconnecting", "warn");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 5000);
    };
  }

  function handle(msg) {
    if (msg.type === "state") showState(msg);
    else if (msg.type === "images") showLiveImages(msg);
    else if (msg.type === "catalog") showCatalog(msg);
  }

  function imageSlot(key, label) {
    let img = images.get(key);
    if (!img) {
      const box = document.getElementById("live-images");
      document.getElementById("no-images")?.remove();
      img = S.el("img", {alt: label, "data-key": key, id: "img-" + key.replace(/[^A-Za-z0-9_-]/g, "-")});
      box.append(S.el("figure", {}, img, S.el("figcaption", {text: label})));
      images.set(key, img);
    }
    return img;
  }

  function clearImages() {
    const box = document.getElementById("live-images");
    box.replaceChildren(S.el("p", {className: "muted", id: "no-images", text: "images appear once frames stream"}));
    images.clear();
  }

  function showLiveImages(msg) {
    if (msg.scan !== shownScan || finalShown === msg.scan) return;
    for (const im of msg.images) {
      const img = imageSlot(im.key, im.label);
      if (img.getAttribute("src") !== im.src) img.setAttribute("src", im.src);
    }
  }

  function thresholdsText(t, calibrating) {
    if (calibrating) return "calibrating...";
    if (!t) return "-";
    return `background ${S.num(t.background, 2)} ADU, X-ray ${S.num(t.xray, 1)} ADU (${t.calculated ? "calibrated" : "fixed"})`;
  }

  function showState(msg) {
    const c = msg.control;
    S.set("control-state", c.ok ? "connected" : "not reachable (" + c.error + ")");
    document.getElementById("control-line").className = c.ok ? "muted" : "warn";
    const s = msg.scan;
    if (!s) {
      S.set("scan-number", "-"); S.set("scan-state", c.ok ? "no scan yet" : "no control");
    } else {
      if (s.number !== shownScan || s.epoch !== showState.epoch) {
        shownScan = s.number; showState.epoch = s.epoch; finalShown = null; clearImages();
      }
      S.set("scan-number", String(s.number));
      const state = document.getElementById("scan-state");
      state.textContent = s.state; state.className = "badge " + ({running: "run", closed: "ok", failed: "bad"}[s.state] || "");
      S.set("scan-file", s.path || s.file_name || "");
      const frac = s.frames_expected ? s.frames_written / s.frames_expected : 0;
      document.getElementById("progress-bar").style.width = (100 * Math.min(frac, 1)).toFixed(1) + "%";
      S.set("progress-text", `${(100 * frac).toFixed(1)} %`);
      S.set("frames-written", S.int(s.frames_written), s.frames_written);
      S.set("frames-expected", S.int(s.frames_expected), s.frames_expected);
      S.set("frames-complete", S.int(s.frames_complete), s.frames_complete);
      S.set("frames-incomplete", S.int(s.frames_incomplete), s.frames_incomplete);
      S.set("frames-missing", S.int(s.frames_missing), s.frames_missing);
      S.set("events", S.int(s.events), s.events);
      S.set("events-per-frame", s.frames_written ? S.num(s.events / s.frames_written, 1) : "-");
      S.set("fps-now", s.state === "running" ? S.int(s.fps_now) : "-");
      S.set("fps-mean", S.int(s.fps_mean));
      S.set("elapsed", S.num(s.seconds, 1) + " s");
      S.set("thresholds", thresholdsText(s.thresholds, s.calibrating));
      const links = document.getElementById("scan-links");
      if (s.catalog_id !== null && links.dataset.id !== String(s.catalog_id)) {
        links.dataset.id = String(s.catalog_id);
        links.replaceChildren(S.el("a", {href: `/scans/${s.catalog_id}`, text: "scan page"}), " · ",
          S.el("a", {href: `/scans/${s.catalog_id}/file`, text: "download the file"}));
      } else if (s.catalog_id === null && links.dataset.id) {
        delete links.dataset.id; links.replaceChildren();
      }
      if (s.state !== "running" && s.final_images.length && finalShown !== s.number) {
        finalShown = s.number;  // the images of the closed file, not the last live ones
        for (const im of s.final_images) imageSlot(im.key, im.label).setAttribute("src", im.url);
      }
      if (s.error) S.set("scan-file", "failed: " + s.error);
    }
    showModules(msg.modules, s && s.ledger);
    showRoles(msg.roles);
  }

  // Tables are built once per set of rows; later updates only touch cells whose text changed
  // (rebuilding them 4 times a second would make the browser lay out and paint the page each time).
  function fillTable(tbody, rows) {
    const keys = rows.map((r) => r.key).join("|");
    if (tbody.dataset.keys !== keys) {
      tbody.dataset.keys = keys;
      tbody.replaceChildren(...rows.map((r) => S.el("tr", {}, ...r.cells.map(() => S.el("td")))));
    }
    rows.forEach((r, i) => {
      const tds = tbody.rows[i].cells;
      r.cells.forEach((c, j) => {
        const td = tds[j];
        if (td.textContent !== c.text) td.textContent = c.text;
        const cls = c.cls || "";
        if (td.className !== cls) td.className = cls;
      });
    });
  }

  function showModules(modules, ledger) {
    const L = (name, m) => ledger && ledger[name] ? S.int(ledger[name][m]) : "-";
    fillTable(document.querySelector("#modules tbody"), modules.map((m) => ({key: String(m.module), cells: [
      {text: String(m.module)}, {text: S.int(m.records_sent), cls: "num"},
      {text: S.int(m.records_spilled), cls: "num" + (m.records_spilled ? " warn" : "")},
      {text: L("sectors_received", m.module), cls: "num"}, {text: L("sectors_missing", m.module), cls: "num"},
      {text: L("sectors_duplicate", m.module), cls: "num"}, {text: L("sectors_rejected", m.module), cls: "num"},
      {text: L("sectors_lost", m.module), cls: "num"}]})));
    const note = document.getElementById("ledger-note");
    if (note.hidden !== !!ledger) note.hidden = !!ledger;
  }

  function showRoles(roles) {
    const health = {ok: "health-ok", late: "health-late", silent: "health-silent"};
    fillTable(document.querySelector("#roles tbody"), roles.map((r) => ({key: r.key, cells: [
      {text: r.key},
      {text: r.health, cls: health[r.health] || ""},
      {text: S.num(r.age_s, 1) + " s ago", cls: "num"},
      {text: Object.entries(r.counters || {}).map(([k, v]) => `${k.replace(/_/g, " ")} ${S.int(v)}`).join(", ")
        + (r.pending_blocks ? `, pending blocks ${r.pending_blocks}` : "")},
      {text: S.int(r.rejected), cls: "num" + (r.rejected ? " warn" : "")},
      {text: S.num(r.cpu_s, 1), cls: "num"},
      {text: S.num(r.rss_mib, 0) + " MiB", cls: "num"}]})));
  }

  function showCatalog(msg) {
    S.set("catalog-count", S.int(msg.count));
    const body = document.getElementById("catalog-body");
    if (!msg.scans.length) { body.replaceChildren(S.el("tr", {className: "empty"}, S.el("td", {colspan: 8, text: "no scans yet"}))); return; }
    body.replaceChildren(...msg.scans.map(S.catalogRow));
  }

  document.getElementById("start-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target, out = document.getElementById("start-result");
    const body = {scan_shape: f.scan_shape.value, frames_per_position: Number(f.frames_per_position.value || 1)};
    if (f.scan_number.value !== "") body.scan_number = Number(f.scan_number.value);
    const r = await S.send("POST", "/api/scans", body, S.token(f.token));
    out.textContent = r.ok ? `scan ${r.data.scan} started: ${r.data.file_name}` : `not started (${r.status}): ${r.data.error}`;
    out.className = r.ok ? "" : "warn";
  });

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) return;
    for (const type of ["state", "images", "catalog"]) {
      const msg = pending.get(type);
      if (msg) handle(msg);
    }
    pending.clear();
  });
  connection("connecting", "");
  connect();
})();
