// Shared helpers. Every text from the server goes into the page through textContent, never HTML.
"use strict";
const S = {
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "className") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  },
  int(v) { return (v === null || v === undefined) ? "-" : Math.round(Number(v)).toLocaleString("en-US"); },
  num(v, digits) { return (v === null || v === undefined) ? "-" : Number(v).toFixed(digits); },
  set(id, text, value) {
    const node = document.getElementById(id);
    if (!node) return;
    if (node.textContent !== text) node.textContent = text;
    if (value !== undefined) node.dataset.value = String(value);
  },
  when(t) {
    if (!t) return "-";
    const d = new Date(t * 1000), p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  },
  token(input) {
    const given = input && input.value.trim();
    if (given) { sessionStorage.setItem("stemstream-token", given); return given; }
    return sessionStorage.getItem("stemstream-token") || "";
  },
  async send(method, url, body, token) {
    const headers = {"Accept": "application/json"};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers["Authorization"] = "Bearer " + token;
    const r = await fetch(url, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    let data = {};
    try { data = await r.json(); } catch (e) { data = {error: r.statusText}; }
    return {ok: r.ok, status: r.status, data};
  },
  catalogRow(s) {
    const thumb = s.thumbnail ? S.el("a", {href: s.url}, S.el("img", {className: "thumb", src: s.thumbnail, alt: `scan ${s.scan_number}`, loading: "lazy"})) : "";
    const shape = `${s.scan_rows} x ${s.scan_cols}` + (s.frames_per_position > 1 ? ` x ${s.frames_per_position}` : "");
    const status = s.accounted === null ? S.el("span", {className: "badge", text: "no ledger"})
      : S.el("span", {className: "badge " + (s.accounted ? "ok" : "warn"), text: s.accounted ? "complete" : "incomplete"});
    return S.el("tr", {"data-id": s.id},
      S.el("td", {}, thumb),
      S.el("td", {}, S.el("a", {href: s.url, text: String(s.scan_number)})),
      S.el("td", {text: S.when(s.closed)}),
      S.el("td", {text: shape}),
      S.el("td", {className: "num", text: `${S.int(s.frames_complete)} / ${S.int(s.frames_expected)}`}),
      S.el("td", {className: "num", text: S.int(s.events)}),
      S.el("td", {}, status),
      S.el("td", {className: "path"}, S.el("a", {href: s.file_url, title: s.path, text: s.file_name})));
  },
};
