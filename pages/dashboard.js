// The dashboard: asks for a key once (kept in this tab's session storage, sent only as
// X-API-Key to this service), reads dashboard/data every few seconds and draws it as SVG.
// Everything is built with DOM calls (textContent, setAttribute): nothing the service
// returns is ever parsed as HTML.
"use strict";

const STORE = "text-tool-key";
const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#3b7dd8", "#e39b2d", "#43a36b", "#9b59b6", "#d8453b", "#2bb0b5", "#7f8c8d", "#c2185b"];
const $ = (id) => document.getElementById(id);
let timer = null;
let last = null;

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

const money = (x) => (x >= 1 ? x.toFixed(2) : x.toPrecision(2));
const count = (n) => Math.round(n).toLocaleString("en-US");

function signedOut(message) {
  sessionStorage.removeItem(STORE);
  clearTimeout(timer);
  $("board").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("key").focus();
}

async function load() {
  const key = sessionStorage.getItem(STORE);
  if (!key) return signedOut();
  const params = new URLSearchParams();
  for (const name of ["key", "model", "status"]) {
    const value = $("filter-" + name).value;
    if (value) params.set(name, value);
  }
  let answer;
  try {
    answer = await fetch("dashboard/data?" + params, { headers: { "X-API-Key": key }, cache: "no-store" });
  } catch (err) {
    $("status").textContent = "The service did not answer; trying again.";
    timer = setTimeout(load, REFRESH_MS);
    return;
  }
  if (answer.status === 401) return signedOut("That key was refused (401).");
  const body = await answer.json();
  if (!answer.ok) {
    $("status").textContent = (body.error && body.error.message) || "HTTP " + answer.status;
    timer = setTimeout(load, REFRESH_MS);
    return;
  }
  last = body;
  $("sign-in").hidden = true;
  $("board").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = body.key + (body.admin ? " (admin: every key)" : "");
  draw(body);
  $("status").textContent = "Updated " + body.now + "; every " + REFRESH_MS / 1000 + " s.";
  timer = setTimeout(load, REFRESH_MS);
}

function draw(d) {
  tiles(d);
  const stack = $("stack").value;
  stacked($("spend-chart"), $("spend-legend"), d, stack, (r) => r.cost_usd, money, "spend");
  stacked($("tokens-chart"), $("tokens-legend"), d, stack, (r) => r.input_tokens + r.output_tokens, count, "tokens");
  hourly($("hourly-chart"), d);
  latency(d);
  budgets(d);
  now(d);
  calls(d);
}

function tiles(d) {
  const today = d.now.slice(0, 10);
  const todays = d.daily.filter((r) => r.day === today);
  const sum = (rows, f) => rows.reduce((a, r) => a + f(r), 0);
  const items = [
    ["spend-today", "spent today, $", money(sum(todays, (r) => r.cost_usd))],
    ["tokens-today", "tokens today", count(sum(todays, (r) => r.input_tokens + r.output_tokens))],
    ["requests-48h", "requests, 48 h", count(sum(d.hourly, (r) => r.requests))],
    ["errors-48h", "errors, 48 h", count(sum(d.hourly, (r) => r.errors))],
  ];
  const box = $("tiles");
  box.replaceChildren();
  for (const [id, label, value] of items) {
    const tile = el("div", { id: "tile-" + id });
    tile.append(el("div", { class: "value" }, value), el("div", { class: "label" }, label));
    box.append(tile);
  }
}

function days(d) {
  const out = [];
  const end = Date.parse(d.now.slice(0, 10) + "T00:00:00Z");
  for (let i = d.days - 1; i >= 0; i--) out.push(new Date(end - i * 86400000).toISOString().slice(0, 10));
  return out;
}

// Bars a day, stacked by `by` ("key" or "model"); each piece holds its figure in
// data-value, and a <title> for a pointer.
function stacked(box, legend, d, by, value, format, what) {
  const W = 600, H = 220, L = 48, B = 24, T = 8;
  const dayList = days(d);
  const series = [...new Set(d.daily.map((r) => r[by] || "?"))].sort();
  const totals = {};
  for (const r of d.daily) totals[r.day] = (totals[r.day] || 0) + value(r);
  const max = Math.max(0, ...Object.values(totals)) || 1;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": what + " a day", "data-chart": what });
  const step = (W - L) / dayList.length;
  chart.append(axis(L, T, W, H - B, max, format));
  dayList.forEach((day, i) => {
    let y = H - B;
    for (const name of series) {
      const v = d.daily.filter((r) => r.day === day && (r[by] || "?") === name).reduce((a, r) => a + value(r), 0);
      if (!v) continue;
      const h = (v / max) * (H - B - T);
      y -= h;
      const rect = svg("rect", { x: L + i * step + 2, y, width: Math.max(step - 4, 1), height: Math.max(h, 0.5),
        fill: COLORS[series.indexOf(name) % COLORS.length], "data-day": day, "data-series": name, "data-value": v });
      const title = svg("title");
      title.textContent = `${day} ${name}: ${format(v)}`;
      rect.append(title);
      chart.append(rect);
    }
    if (i % Math.ceil(dayList.length / 7) === 0) {
      const label = svg("text", { x: L + i * step + step / 2, y: H - 8, "text-anchor": "middle" });
      label.textContent = day.slice(5);
      chart.append(label);
    }
  });
  box.replaceChildren(chart);
  legend.replaceChildren(...series.map((name, i) => {
    const item = el("span");
    item.append(el("span", { class: "swatch" }), name);
    item.firstChild.setAttribute("data-color", COLORS[i % COLORS.length]);
    item.firstChild.style.background = COLORS[i % COLORS.length];
    return item;
  }));
}

function axis(L, T, W, bottom, max, format) {
  const g = svg("g");
  for (const share of [0, 0.5, 1]) {
    const y = bottom - share * (bottom - T);
    g.append(svg("line", { x1: L, x2: W, y1: y, y2: y, stroke: "#e4e7ec" }));
    const label = svg("text", { x: L - 4, y: y + 3, "text-anchor": "end" });
    label.textContent = format(max * share);
    g.append(label);
  }
  return g;
}

function hourly(box, d) {
  const W = 600, H = 200, L = 40, B = 24, T = 8;
  const end = Date.parse(d.now.slice(0, 13) + ":00:00Z");
  const hours = [];
  for (let i = d.hours - 1; i >= 0; i--) hours.push(new Date(end - i * 3600000).toISOString().slice(0, 19) + "Z");
  const byHour = Object.fromEntries(d.hourly.map((r) => [r.hour, r]));
  const max = Math.max(1, ...d.hourly.map((r) => r.requests));
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "requests and errors an hour", "data-chart": "hourly" });
  chart.append(axis(L, T, W, H - B, max, count));
  const step = (W - L) / hours.length;
  hours.forEach((hour, i) => {
    const r = byHour[hour];
    if (r) {
      for (const [kind, n, color] of [["requests", r.requests, "#3b7dd8"], ["errors", r.errors, "#d8453b"]]) {
        if (!n) continue;
        const h = (n / max) * (H - B - T);
        const rect = svg("rect", { x: L + i * step + 1, y: H - B - h, width: Math.max(step - 2, 1), height: h, fill: color,
          "data-hour": hour, "data-kind": kind, "data-value": n });
        const title = svg("title");
        title.textContent = `${hour} ${kind}: ${n}`;
        rect.append(title);
        chart.append(rect);
      }
    }
    if (i % 12 === 0) {
      const label = svg("text", { x: L + i * step, y: H - 8 });
      label.textContent = hour.slice(11, 16);
      chart.append(label);
    }
  });
  box.replaceChildren(chart);
}

function rows(tbody, lines) {
  tbody.replaceChildren(...lines.map(([cells, cls]) => {
    const tr = el("tr", cls ? { class: cls } : {});
    for (const [text, num] of cells) tr.append(el("td", num ? { class: "num" } : {}, text === null || text === undefined ? "–" : String(text)));
    return tr;
  }));
}

function latency(d) {
  rows($("latency").tBodies[0], d.latency.map((r) => [[
    [r.model], [r.calls, 1], [r.p50_ms, 1], [r.p95_ms, 1], [r.ttft_p50_ms, 1], [r.ttft_p95_ms, 1],
  ]]));
}

function budgets(d) {
  const box = $("budgets");
  if (!d.budgets.length) return box.replaceChildren(el("p", { class: "muted" }, "No budget is set."));
  box.replaceChildren(...d.budgets.map((b) => {
    const share = b.budget_usd ? b.spent_usd / b.budget_usd : 1;
    const item = el("div", { class: "budget", "data-key": b.key, "data-spent": b.spent_usd, "data-budget": b.budget_usd });
    item.append(el("div", {}, `${b.key}: $${money(b.spent_usd)} of $${money(b.budget_usd)} this ${b.period}`));
    const bar = el("div", { class: share >= 1 ? "bar over" : "bar" });
    const fill = el("div");
    fill.style.width = Math.min(100, share * 100).toFixed(1) + "%";
    bar.append(fill);
    item.append(bar);
    return item;
  }));
}

function now(d) {
  const flying = Object.entries(d.in_flight);
  $("in-flight").replaceChildren(flying.length
    ? el("p", {}, flying.map(([k, n]) => `${k}: ${n}`).join(", "))
    : el("p", { class: "muted" }, "none"));
  rows($("deployments").tBodies[0], d.deployments.map((s) => [[
    [s.name], [s.state + (s.cooling_s ? " for " + s.cooling_s + " s" : "")], [s.in_flight, 1], [s.calls, 1], [s.failed_calls, 1],
  ]]));
}

function calls(d) {
  for (const [name, values] of [["key", d.daily.map((r) => r.key)], ["model", d.daily.map((r) => r.model)]]) {
    const select = $("filter-" + name);
    const known = new Set([...select.options].map((o) => o.value));
    for (const v of [...new Set(values)].sort()) if (v && !known.has(v)) select.append(el("option", { value: v }, v));
  }
  rows($("calls").tBodies[0], d.calls.map((c) => [[
    [c.at.slice(5, 19).replace("T", " ")], [c.key], [c.route], [c.model], [c.status, 1],
    [c.input_tokens, 1], [c.output_tokens, 1], [c.cost_usd === null ? null : money(c.cost_usd), 1],
    [Math.round(c.duration_ms), 1], [c.ttft_ms === null ? null : Math.round(c.ttft_ms), 1],
  ], c.status >= 400 ? "status-error" : ""]));
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORE, $("key").value.trim());
    $("key").value = "";
    load();
  });
  $("sign-out").addEventListener("click", () => signedOut());
  $("stack").addEventListener("change", () => last && draw(last));
  $("filters").addEventListener("change", () => { clearTimeout(timer); load(); });
  load();
});
