// The dashboard: /status and /switches drawn as tables, kept current by /events, with
// the engine log of the model being started streamed from /models/<id>/logs.
"use strict";

// The key lives for this tab only: sessionStorage is gone when the tab closes, and no
// other site's page can read it.
const KEY_STORE = "model-orchestrator.api-key";
const $ = (selector) => document.querySelector(selector);

let status = null;
let logStream = null;
let logModel = null;
let refreshTimer = null;

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Every request goes through here: changes as JSON (the daemon refuses other bodies),
// and with the key once one was asked for. A 401 or 403 asks for it once.
async function api(method, path, body) {
  const init = () => ({
    method,
    headers: headers(method === "GET" ? {} : { "Content-Type": "application/json" }),
    body: method === "GET" ? undefined : JSON.stringify(body || {}),
  });
  let response = await fetch(path, init());
  if (response.status === 401 || response.status === 403) {
    const key = window.prompt("This daemon needs an API key:");
    if (!key) return response;
    sessionStorage.setItem(KEY_STORE, key);
    response = await fetch(path, init());
  }
  return response;
}

// Server-sent events read with fetch, which (unlike EventSource) can send the key.
// Calls handlers[event](data) per event; returns a handle whose close() stops it.
function stream(path, handlers, onEnd) {
  const controller = new AbortController();
  (async () => {
    try {
      const response = await fetch(path, { headers: headers(), signal: controller.signal });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = "message";
          const data = [];
          for (const line of frame.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
          }
          if (data.length && handlers[event]) handlers[event](data.join("\n"));
        }
      }
      onEnd(null);
    } catch (error) {
      if (!controller.signal.aborted) onEnd(error);
    }
  })();
  return { close: () => controller.abort() };
}

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function cell(row, value, className) {
  const td = row.insertCell();
  td.textContent = text(value);
  if (className) td.className = className;
  return td;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function showMessage(message, ok = false) {
  const box = $("#message");
  box.hidden = !message;
  box.textContent = message || "";
  box.className = ok ? "message ok" : "message";
}

function modelState(model) {
  if (status.active === model.id) return status.state;
  if (status.target === model.id) return status.state;
  if (model.enabled === false) return "disabled";
  if (model.residency === "asleep") return "asleep";
  // Its container runs, but only the start gate's shell: the engine never started.
  if (status.standby.models.includes(model.id)) return "standby";
  return model.container ? model.container.state : "stopped";
}

function renderSummary() {
  const badge = $("#state-badge");
  badge.textContent = status.active ? `${status.state}: ${status.active}` : status.state;
  badge.className = `badge ${status.state}`;
  $("#summary").dataset.state = status.state;
  $("#state-reason").textContent = text(status.reason);
  $("#stop").disabled =
    !status.active && status.state !== "failed" && status.warm_pool.asleep.length === 0;
  const pool = status.warm_pool;
  $("#warm-pool").textContent = pool.asleep.length
    ? `asleep: ${pool.asleep.join(", ")} (${pool.asleep.length} of ${pool.max_asleep},` +
      ` ~${gib(pool.ram_bytes)} of host RAM)`
    : "";
  const standby = status.standby.models;
  $("#standby").textContent = standby.length
    ? `standing by (container started, engine held): ${standby.join(", ")}`
    : "";
}

function gib(bytes) {
  return `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
}

function renderModels() {
  const body = $("#models tbody");
  body.replaceChildren();
  for (const model of status.models) {
    const row = body.insertRow();
    const state = modelState(model);
    row.dataset.model = model.id;
    row.dataset.state = state;
    if (status.active === model.id) row.classList.add("active");
    cell(row, model.display_name, "name");
    cell(row, model.id);
    const verdict = model.cache ? model.cache.status : "n/a";
    const verdictCell = cell(row, verdict, `verdict-${verdict}`);
    if (model.cache) verdictCell.title = model.cache.reason;
    cell(row, state);
    cell(row, duration(model.uptime));
    const actions = row.insertCell();
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Switch";
    button.dataset.action = "switch";
    button.disabled =
      model.enabled === false ||
      verdict === "missing" ||
      verdict === "incomplete" ||
      (status.active === model.id && status.state === "ready");
    button.addEventListener("click", () => switchTo(model.id));
    actions.appendChild(button);
  }
}

async function renderHistory() {
  const response = await api("GET", "/switches");
  if (!response.ok) return;
  const { switches } = await response.json();
  const body = $("#history tbody");
  body.replaceChildren();
  for (const record of switches.slice(0, 15)) {
    const row = body.insertRow();
    cell(row, new Date(record.requested_at).toLocaleTimeString());
    cell(row, record.from);
    cell(row, record.kind === "switch" ? record.to : `(${record.kind})`);
    cell(row, record.path ? `${record.outcome} (${record.path})` : record.outcome);
    cell(row, duration(record.duration));
    cell(row, record.error ? record.error.message : "");
  }
}

async function refresh() {
  const response = await api("GET", "/status");
  if (!response.ok) return;
  status = await response.json();
  renderSummary();
  renderModels();
  followLogOf(status.target || status.active);
  await renderHistory();
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 100);
}

function followLogOf(model) {
  if (!model || model === logModel) return;
  if (logStream) logStream.close();
  logModel = model;
  $("#log-model").textContent = `(${model})`;
  $("#log").textContent = "";
  const path = `/models/${encodeURIComponent(model)}/logs?follow=true&tail=50`;
  const handle = stream(
    path,
    {
      log: (data) => {
        const log = $("#log");
        log.textContent += JSON.parse(data) + "\n";
        log.scrollTop = log.scrollHeight;
      },
    },
    (error) => {
      // No container yet, or it went away: try again while the model is still wanted.
      if (error && logStream === handle) {
        logModel = null;
        setTimeout(() => {
          if (status && (status.target === model || status.active === model)) followLogOf(model);
        }, 1000);
      }
    },
  );
  logStream = handle;
}

async function switchTo(model) {
  showMessage("");
  const response = await api("POST", "/switch", { model, wait: false });
  if (!response.ok && response.status !== 202) {
    const { error } = await response.json();
    showMessage(error ? error.message : `switch failed: HTTP ${response.status}`);
  }
  scheduleRefresh();
}

async function stop() {
  showMessage("");
  const response = await api("POST", "/stop", { wait: false });
  if (!response.ok && response.status !== 202) {
    const { error } = await response.json();
    showMessage(error ? error.message : `stop failed: HTTP ${response.status}`);
  }
  scheduleRefresh();
}

function listen() {
  const handlers = {};
  for (const kind of ["state", "switch_requested", "rolled_back", "model_died", "pull"]) {
    handlers[kind] = scheduleRefresh;
  }
  handlers.switch_finished = (data) => {
    const finished = JSON.parse(data);
    if (finished.error) showMessage(finished.error.message);
    scheduleRefresh();
  };
  // The stream ends when the daemon restarts; connect again and catch up.
  stream("/events", handlers, () => setTimeout(() => { scheduleRefresh(); listen(); }, 1000));
}

$("#stop").addEventListener("click", stop);
refresh();
listen();
