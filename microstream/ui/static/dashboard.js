// The dashboard's only script: poll the JSON views every second and put the values in place.
// Every number keeps its exact JSON value in data-value (what the browser test reads); the
// text is that value formatted. Charts arrive as SVG markup drawn by the server.
"use strict";

const POLL_MS = 1000;

function byId(id) { return document.getElementById(id); }

function show(id, value, text) {
  const el = byId(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text === undefined ? (value === null || value === undefined ? "–" : String(value)) : text;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function clock(iso) {
  // "2026-01-01T12:00:05.250000Z" -> "2026-01-01 12:00:05 UTC" (the exact value stays in data-value)
  return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(Z|\+00:00)$/, "") + " UTC";
}

function connected(ok) {
  const el = byId("connection");
  el.textContent = ok ? "live, updated every second" : "server unreachable, retrying";
  el.classList.toggle("lost", !ok);
}

function cell(row, text, field, value) {
  const td = document.createElement("td");
  td.textContent = text;
  if (field) { td.dataset.field = field; td.dataset.value = value === null || value === undefined ? "" : String(value); }
  row.appendChild(td);
  return td;
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function repeat(fn) {
  fn().then(() => connected(true), () => connected(false)).finally(() => setTimeout(() => repeat(fn), POLL_MS));
}

// -- the query list ------------------------------------------------------------------------

async function pollIndex() {
  const queries = await getJson("/api/queries");
  const body = byId("queries").tBodies[0];
  body.replaceChildren();
  for (const q of queries) {
    const row = body.insertRow();
    row.dataset.key = q.key;
    const link = document.createElement("a");
    link.href = "/query/" + encodeURIComponent(q.key);
    link.textContent = q.name || q.id || q.key;
    row.insertCell().appendChild(link);
    cell(row, q.kind);
    cell(row, q.error ? "unreadable: " + q.error : q.state, "state", q.state);
    cell(row, fmt(q.batch_id, 0), "batch_id", q.batch_id);
    cell(row, fmt(q.processed_rows_per_second, 1), "processed_rows_per_second", q.processed_rows_per_second);
    cell(row, q.checkpoint);
  }
  byId("no-queries").hidden = queries.length > 0;
}

// -- one query -------------------------------------------------------------------------------

const queryKey = decodeURIComponent(location.pathname.replace(/^\/query\//, ""));
const stateShown = { store: null, batch: null };

async function pollQuery() {
  let view;
  try {
    view = await getJson("/api/query/" + encodeURIComponent(queryKey));
  } catch (error) {
    byId("load-error").textContent = error.message;
    byId("load-error").hidden = false;
    throw error;
  }
  byId("load-error").hidden = true;
  document.title = "microstream: " + (view.name || view.key);
  byId("query-name").textContent = view.name || view.id || view.key;
  show("query-state", view.state);
  byId("status").textContent = view.status || "";
  byId("query-id").textContent = view.id || "–";
  byId("run-id").textContent = view.run_id || "–";
  byId("checkpoint").textContent = view.checkpoint;

  const last = view.last;
  show("batch-id", view.batch_id);
  show("input-rows", last && last.num_input_rows, fmt(last && last.num_input_rows, 0));
  show("output-rows", last && last.num_output_rows, fmt(last && last.num_output_rows, 0));
  show("input-rate", last && last.input_rows_per_second, fmt(last && last.input_rows_per_second, 1));
  show("processed-rate", last && last.processed_rows_per_second, fmt(last && last.processed_rows_per_second, 1));
  show("duration-total", last && last.durations_ms.total, fmt(last && last.durations_ms.total, 1));
  for (const phase of ["latest_offset", "wal", "read", "compute", "sink", "commit"]) {
    const ms = last && last.durations_ms[phase];
    show("duration-" + phase, ms, fmt(ms, 1));
  }
  show("late-rows", view.late_rows, fmt(view.late_rows, 0));
  show("late-rows-recent", view.late_rows_recent, fmt(view.late_rows_recent, 0));
  show("watermark", last && last.watermark, last && last.watermark ? clock(last.watermark) : "none yet");
  show("wall-clock", view.now, clock(view.now));
  show("watermark-lag", view.watermark_lag_s, fmt(view.watermark_lag_s, 1));

  const operators = byId("state-operators").tBodies[0];
  operators.replaceChildren();
  for (const op of last ? last.state_operators : []) {
    const row = operators.insertRow();
    row.dataset.operator = op.operator_id;
    cell(row, op.operator_id);
    cell(row, op.kind, "kind", op.kind);
    for (const field of ["num_rows_total", "memory_bytes", "num_rows_updated", "num_rows_removed", "num_rows_dropped_late"]) {
      cell(row, fmt(op[field], 0), field, op[field]);
    }
  }
  const sources = byId("sources").tBodies[0];
  sources.replaceChildren();
  (last ? last.sources : []).forEach((src, i) => {
    const row = sources.insertRow();
    row.dataset.source = String(i);
    cell(row, src.description, "description", src.description);
    cell(row, fmt(src.num_input_rows, 0), "num_input_rows", src.num_input_rows);
    cell(row, src.lag === null ? "unknown" : fmt(src.lag, 0), "lag", src.lag);
    cell(row, JSON.stringify(src.end_offset), "end_offset", JSON.stringify(src.end_offset));
  });

  byId("plan").textContent = view.plan;
  show("error", view.error, view.error || "none");
  byId("error").classList.toggle("error", Boolean(view.error));
  for (const [name, svg] of Object.entries(view.charts)) {
    const figure = byId("chart-" + name);
    if (figure && figure.dataset.svg !== svg) { figure.innerHTML = svg; figure.dataset.svg = svg; }
  }
  await refreshState(view);
}

async function refreshState(view) {
  const select = byId("state-store");
  const options = Array.from(select.options).map((o) => o.value);
  if (options.join("\n") !== view.stores.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...view.stores.map((store) => new Option(store, store)));
    if (view.stores.includes(chosen)) select.value = chosen;
  }
  const info = byId("state-info");
  if (!view.stores.length) { info.textContent = "this query keeps no state"; return; }
  if (stateShown.store === select.value && stateShown.batch === view.batch_id) return;
  const store = select.value;
  const batch = view.batch_id;
  const state = await getJson("/api/query/" + encodeURIComponent(queryKey) + "/state?store=" + encodeURIComponent(store));
  const table = byId("state-table");
  const head = document.createElement("tr");
  state.columns.forEach((column, i) => {
    const th = document.createElement("th");
    th.textContent = column;
    th.title = state.dtypes[i];
    head.appendChild(th);
  });
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...state.rows.map((values) => {
    const row = document.createElement("tr");
    for (const value of values) cell(row, value === null ? "null" : String(value));
    return row;
  }));
  table.dataset.store = store;
  table.dataset.batchId = batch === null ? "" : String(batch);
  info.textContent = state.rows.length < state.limit
    ? `${state.rows.length} rows, as of the last committed batch`
    : `the first ${state.limit} rows (all of them: ms.read_state or microstream state)`;
  stateShown.store = store;
  stateShown.batch = batch;
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "index") repeat(pollIndex);
  if (page === "query") {
    byId("state-store").addEventListener("change", () => { stateShown.store = null; });
    repeat(pollQuery);
  }
});
