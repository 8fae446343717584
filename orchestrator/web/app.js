// The dashboard: /status and /switches drawn as tables, kept current by /events, with
// the engine log of the model being started streamed from /models/<id>/logs.
"use strict";

const KEY_STORE = "model-orchestrator.api-key";
const $ = (selector) => document.querySelector(selector);

let status = null;
let logSource = null;
let logModel = null;
let refreshTimer = null;

function headers(extra = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  let response = await fetch(path, init);
  if (response.status === 401 || response.status === 403) {
    // Changes need a key when the daemon has keys; ask once and keep it in this browser.
    const key = window.prompt("This daemon needs an API key for changes:");
    if (!key) return response;
    localStorage.setItem(KEY_STORE, key);
    init.headers = headers(body ? { "Content-Type": "application/json" } : {});
    response = await fetch(path, init);
  }
  return response;
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
  return model.container ? model.container.state : "stopped";
}

function renderSummary() {
  const badge = $("#state-badge");
  badge.textContent = status.active ? `${status.state}: ${status.active}` : status.state;
  badge.className = `badge ${status.state}`;
  $("#summary").dataset.state = status.state;
  $("#state-reason").textContent = text(status.reason);
  $("#stop").disabled = !status.active && status.state !== "failed";
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
  const response = await fetch("/switches");
  if (!response.ok) return;
  const { switches } = await response.json();
  const body = $("#history tbody");
  body.replaceChildren();
  for (const record of switches.slice(0, 15)) {
    const row = body.insertRow();
    cell(row, new Date(record.requested_at).toLocaleTimeString());
    cell(row, record.from);
    cell(row, record.kind === "stop" ? "(stop)" : record.to);
    cell(row, record.outcome);
    cell(row, duration(record.duration));
    cell(row, record.error ? record.error.message : "");
  }
}

async function refresh() {
  const response = await fetch("/status");
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
  if (logSource) logSource.close();
  logModel = model;
  $("#log-model").textContent = `(${model})`;
  $("#log").textContent = "";
  const source = new EventSource(`/models/${encodeURIComponent(model)}/logs?follow=true&tail=50`);
  logSource = source;
  source.addEventListener("log", (event) => {
    const log = $("#log");
    log.textContent += JSON.parse(event.data) + "\n";
    log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("end", () => source.close());
  source.onerror = () => {
    // No container yet, or it went away: try again while the model is still wanted.
    source.close();
    if (logSource === source) {
      logModel = null;
      setTimeout(() => {
        if (status && (status.target === model || status.active === model)) followLogOf(model);
      }, 1000);
    }
  };
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
  const events = new EventSource("/events");
  for (const kind of ["state", "switch_requested", "switch_finished", "rolled_back", "model_died", "pull"]) {
    events.addEventListener(kind, scheduleRefresh);
  }
  events.addEventListener("switch_finished", (event) => {
    const data = JSON.parse(event.data);
    if (data.error) showMessage(data.error.message);
  });
}

$("#stop").addEventListener("click", stop);
refresh();
listen();
