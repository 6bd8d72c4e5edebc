// sarai-router's live page. Plain JavaScript, no build step, nothing from elsewhere.
//
// Everything shown that comes from the server (model names, reasons, prompts, errors) goes
// in through textContent or attributes, never as HTML: a prompt is untrusted text.
// The API key is asked for once and kept in this tab's sessionStorage; it travels in the
// Authorization header only (never in a URL), which is why the event stream is read with
// fetch() instead of EventSource.
"use strict";

const KEY_NAME = "sarai-router.api-key";
const WINDOW_SECONDS = 300;
const BUCKET_SECONDS = 10;
const FEED_ROWS = 100;
const MODEL_LOG_ROWS = 30;

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

// -- the API key ---------------------------------------------------------------------------

let keyWaiters = [];

function apiKey() { return sessionStorage.getItem(KEY_NAME) || ""; }

function headers(json) {
  const result = {};
  const key = apiKey();
  if (key) result["Authorization"] = "Bearer " + key;
  if (json) result["Content-Type"] = "application/json";
  return result;
}

function askForKey() {
  const refused = apiKey() !== "";
  sessionStorage.removeItem(KEY_NAME);
  $("key-error").textContent = refused ? "The server refused that key." : "";
  $("key-form").hidden = false;
  $("key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function setupKeyForm() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("key-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY_NAME, value);
    $("key-input").value = "";
    $("key-form").hidden = true;
    $("forget-key").hidden = false;
    const waiters = keyWaiters;
    keyWaiters = [];
    for (const resolve of waiters) resolve();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_NAME);
    location.reload();
  });
  $("forget-key").hidden = !apiKey();
}

async function api(path, body) {
  for (;;) {
    const options = body === undefined
      ? { headers: headers(false), cache: "no-store" }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
    const response = await fetch(path, options);
    if (response.status === 401) { await askForKey(); continue; }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (data.error && data.error.message) || ("HTTP " + response.status);
      throw new Error(message);
    }
    return data;
  }
}

// -- formatting ----------------------------------------------------------------------------

function fmtSeconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return Math.round(value * 1000) + " ms";
  if (value < 90) return value.toFixed(1) + " s";
  const minutes = Math.floor(value / 60);
  return minutes + " min " + Math.round(value - minutes * 60) + " s";
}

function fmtNumber(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function fmtClock(time) {
  return new Date(time * 1000).toTimeString().slice(0, 8);
}

// -- the models panel ----------------------------------------------------------------------

const modelRows = new Map();
let clockSkew = 0;          // server time - our time, seconds
let lastStatus = null;
let statusReceived = 0;     // Date.now() / 1000 when lastStatus arrived

function modelRow(name) {
  let row = modelRows.get(name);
  if (row) return row;
  const cells = {};
  const tr = el("tr", { "data-model": name });
  for (const key of ["name", "state", "rss", "pinned", "ttl", "inflight", "queued", "used",
                     "actions"]) {
    cells[key] = el("td", key === "inflight" || key === "queued" ? { class: "num" } : {});
    tr.append(cells[key]);
  }
  cells.name.textContent = name;
  cells.stateBadge = el("span", { class: "state" });
  cells.state.append(cells.stateBadge);
  cells.meter = el("meter", { min: "0", value: "0", max: "1" });
  cells.rssText = el("span");
  cells.rss.append(cells.meter, " ", cells.rssText);
  cells.load = el("button", { type: "button", class: "load", text: "Load" });
  cells.unload = el("button", { type: "button", class: "unload", text: "Unload" });
  cells.actions.append(cells.load, " ", cells.unload);
  cells.load.addEventListener("click", () => residency("load", name, cells));
  cells.unload.addEventListener("click", () => residency("unload", name, cells));
  $("models").tBodies[0].append(tr);
  row = { tr, cells, model: null };
  modelRows.set(name, row);
  return row;
}

async function residency(action, name, cells) {
  const message = $("models-message");
  message.className = "message";
  message.textContent = (action === "load" ? "loading " : "unloading ") + name + "…";
  cells.load.disabled = cells.unload.disabled = true;
  try {
    const answer = await api("/admin/models/" + action, { model: name });
    showStatus(answer);
    message.textContent = action === "load"
      ? (answer.already_loaded ? name + " was already loaded"
                               : name + " loaded in " + fmtSeconds(answer.seconds))
      : (answer.unloaded ? name + " unloaded" : name + " was not loaded");
  } catch (error) {
    message.className = "message error";
    message.textContent = action + " " + name + ": " + error.message;
  } finally {
    refreshButtons();
  }
}

function refreshButtons() {
  for (const { cells, model } of modelRows.values()) {
    if (!model) continue;
    const resident = model.state !== "unloaded";
    cells.load.disabled = resident;
    cells.unload.disabled = !resident || model.pinned;
    cells.unload.title = model.pinned ? "pinned in the config: it stays loaded" : "";
  }
}

function showStatus(status) {
  lastStatus = status;
  statusReceived = Date.now() / 1000;
  clockSkew = status.time - statusReceived;
  const budget = status.ram_budget_mb;
  $("budget-meter").max = budget;
  $("budget-meter").value = status.resident_mb;
  $("budget-text").textContent = Math.round(status.resident_mb) + " MB of "
    + Math.round(budget) + " MB budget; at most " + status.max_loaded + " loaded";
  for (const model of status.models) {
    const { cells } = modelRow(model.name);
    modelRows.get(model.name).model = model;
    cells.stateBadge.textContent = model.state;
    cells.stateBadge.className = "state " + model.state;
    cells.meter.max = budget;
    cells.meter.value = model.rss_mb || 0;
    cells.rssText.textContent = model.rss_mb === null ? "–" : Math.round(model.rss_mb) + " MB";
    cells.pinned.textContent = model.pinned ? "pinned" : "";
    cells.inflight.textContent = model.in_flight;
    cells.queued.textContent = model.queued;
  }
  refreshButtons();
  tick();
}

// The countdowns and "ago"s move every second between two status updates.
function tick() {
  if (!lastStatus) return;
  const elapsed = Date.now() / 1000 - statusReceived;
  const now = Date.now() / 1000 + clockSkew;
  for (const { cells, model } of modelRows.values()) {
    if (!model) continue;
    let ttl;
    if (model.pinned) ttl = "never (pinned)";
    else if (model.expires_in_seconds !== null) {
      ttl = fmtSeconds(Math.max(0, model.expires_in_seconds - elapsed));
    } else if (model.state === "loaded") ttl = "after its requests (TTL " + fmtSeconds(model.ttl_seconds) + ")";
    else ttl = "–";
    cells.ttl.textContent = ttl;
    cells.used.textContent = model.last_used === null ? "–"
      : fmtSeconds(Math.max(0, now - model.last_used)) + " ago";
  }
}

function logModelEvent(event) {
  const data = event.data || {};
  const parts = [fmtClock(event.time), event.model || "", event.kind.replace(/^model_/, "")];
  if (data.load_s !== undefined) parts.push("in " + fmtSeconds(data.load_s));
  if (data.rss_mb !== undefined && data.rss_mb !== null) parts.push(Math.round(data.rss_mb) + " MB");
  if (data.reason) parts.push("(" + data.reason + ")");
  if (data.by) parts.push("for " + data.by);
  if (data.error) parts.push(data.error);
  const list = $("model-log");
  list.prepend(el("li", { text: parts.join(" ") }));
  while (list.children.length > MODEL_LOG_ROWS) list.lastChild.remove();
}

// -- the request feed ----------------------------------------------------------------------

const feedRows = new Map();   // request id -> {tr, cells}
const finished = [];          // {time, tokens, ttft, total} for the charts

function feedRow(event) {
  const id = (event.data && event.data.request_id) || ("?" + event.time);
  let row = feedRows.get(id);
  if (row) return row;
  const cells = {};
  const tr = el("tr", { "data-request-id": id, class: "new" });
  for (const key of ["time", "model", "plugin", "reason", "empathy", "chars", "modality",
                     "fallback", "ttft", "tps", "tokens", "finish"]) {
    const numeric = ["empathy", "chars", "ttft", "tps", "tokens"].includes(key);
    cells[key] = el("td", numeric ? { class: "num " + key } : { class: key });
    tr.append(cells[key]);
  }
  cells.time.textContent = fmtClock(event.time);
  if (event.model) cells.model.textContent = event.model;
  const body = $("feed").tBodies[0];
  body.prepend(tr);
  row = { tr, cells };
  feedRows.set(id, row);
  while (body.rows.length > FEED_ROWS) {
    const last = body.rows[body.rows.length - 1];
    feedRows.delete(last.getAttribute("data-request-id"));
    last.remove();
  }
  return row;
}

function onRequestEvent(event) {
  const data = event.data || {};
  // A row per routed request; refusals of other calls (a bad body, the admin API's own
  // answers) have no routing to show.
  if (event.kind !== "routed" && !feedRows.has(data.request_id)) return;
  const { cells } = feedRow(event);
  switch (event.kind) {
    case "routed": {
      const signals = data.signals || {};
      if (event.model) cells.model.textContent = event.model;
      cells.plugin.textContent = data.plugin || "";
      cells.reason.textContent = data.reason || "";
      cells.empathy.textContent = typeof signals.empathy === "number"
        ? signals.empathy.toFixed(2) : "–";
      cells.chars.textContent = signals.chars ?? "–";
      cells.modality.textContent = signals.modality ?? "–";
      cells.fallback.textContent = data.fallback ? "default model" : "";
      break;
    }
    case "queued":
      cells.finish.textContent = "queued (#" + data.position + ")";
      break;
    case "generation_started":
      cells.finish.textContent = "generating…";
      if (event.model) cells.model.textContent = event.model;
      break;
    case "fallback":
      cells.fallback.textContent = (data.from_model || "") + " → " + (data.to_model || "")
        + (data.reason ? " (" + data.reason + ")" : "");
      if (data.to_model) cells.model.textContent = data.to_model;
      break;
    case "transcribed":
      cells.modality.textContent = "audio → text (" + (data.language || "?") + ")";
      break;
    case "generation_finished":
      cells.ttft.textContent = fmtSeconds(data.ttft_s);
      cells.tps.textContent = fmtNumber(data.tokens_per_second, 1);
      cells.tokens.textContent = (data.prompt_tokens ?? "?") + " + " + (data.completion_tokens ?? "?");
      cells.finish.textContent = data.finish_reason || "";
      finished.push({ time: event.time, tokens: data.completion_tokens || 0,
                      ttft: data.ttft_s, total: data.total_s });
      finished.sort((a, b) => a.time - b.time);
      break;
    case "request_refused":
      cells.finish.textContent = (data.status || "") + " " + (data.code || "");
      cells.finish.title = data.message || "";
      cells.finish.classList.add("error");
      break;
  }
}

// -- charts --------------------------------------------------------------------------------

function median(values) {
  const sorted = values.filter((v) => typeof v === "number").sort((a, b) => a - b);
  if (!sorted.length) return null;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function buckets() {
  const now = Date.now() / 1000 + clockSkew;
  const count = WINDOW_SECONDS / BUCKET_SECONDS;
  const result = Array.from({ length: count }, () => []);
  while (finished.length && finished[0].time < now - WINDOW_SECONDS) finished.shift();
  for (const item of finished) {
    const index = count - 1 - Math.floor((now - item.time) / BUCKET_SECONDS);
    if (index >= 0 && index < count) result[index].push(item);
  }
  return result;
}

function drawAxes(ctx, width, height, max, unit) {
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#667";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(max.toFixed(max < 10 ? 1 : 0) + " " + unit, 4, 12);
  ctx.fillText("-5 min", 4, height - 4);
  ctx.fillText("now", width - 26, height - 4);
  ctx.strokeStyle = "#dde";
  ctx.beginPath(); ctx.moveTo(0, height - 16.5); ctx.lineTo(width, height - 16.5); ctx.stroke();
}

function drawCharts() {
  const data = buckets();
  const draw = (id, bars, line, unit) => {
    const canvas = $(id);
    const ctx = canvas.getContext("2d");
    const { width, height } = canvas;
    const top = 18, bottom = height - 17, step = width / data.length;
    const max = Math.max(1e-9, ...bars.filter((v) => v !== null),
                         ...line.filter((v) => v !== null));
    drawAxes(ctx, width, height, max, unit);
    const y = (v) => bottom - (v / max) * (bottom - top);
    ctx.fillStyle = "#2a6fdb";
    bars.forEach((v, i) => { if (v) ctx.fillRect(i * step + 1, y(v), step - 2, bottom - y(v)); });
    ctx.strokeStyle = "#b36b00"; ctx.fillStyle = "#b36b00";
    ctx.beginPath();
    let started = false;
    line.forEach((v, i) => {
      if (v === null) return;
      const x = i * step + step / 2;
      if (started) ctx.lineTo(x, y(v)); else { ctx.moveTo(x, y(v)); started = true; }
      ctx.fillRect(x - 2, y(v) - 2, 4, 4);
    });
    ctx.stroke();
  };
  const tokens = data.map((b) => b.length ? b.reduce((s, x) => s + x.tokens, 0) / BUCKET_SECONDS : null);
  const requests = data.map((b) => b.length || null);
  // Two scales in one chart would mislead: requests are drawn scaled to the token bars.
  const maxTokens = Math.max(1, ...tokens.filter((v) => v !== null));
  const maxRequests = Math.max(1, ...requests.filter((v) => v !== null));
  draw("throughput", tokens, requests.map((v) => v === null ? null : v * maxTokens / maxRequests),
       "tok/s");
  draw("latency", data.map((b) => median(b.map((x) => x.ttft))),
       data.map((b) => median(b.map((x) => x.total))), "s");
}

// -- the event stream ----------------------------------------------------------------------

function onFrame(payload) {
  if (payload.type === "status") {
    showStatus(payload);
    // A page that could not keep up (a hidden tab, a slow link) is told what it missed.
    if (payload.lost) setConnection("live (" + payload.lost + " events missed)", "live");
    return;
  }
  if (payload.type === "live") { setConnection("live", "live"); return; }
  if (payload.type !== "event") return;
  if (payload.kind.startsWith("model_") || payload.kind === "load_failed") logModelEvent(payload);
  else if (payload.data && payload.data.request_id !== undefined) onRequestEvent(payload);
}

function setConnection(text, state) {
  const conn = $("conn");
  conn.textContent = text;
  conn.className = "conn " + (state || "");
}

async function stream() {
  for (;;) {
    try {
      const response = await fetch("/admin/events", { headers: headers(false), cache: "no-store" });
      if (response.status === 401) { await askForKey(); continue; }
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      // Each connection starts with the recent past: what an earlier one showed comes again.
      $("model-log").replaceChildren();
      finished.length = 0;
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
          const data = frame.split("\n").filter((line) => line.startsWith("data: "))
            .map((line) => line.slice(6)).join("\n");
          if (data) onFrame(JSON.parse(data));
        }
      }
      setConnection("disconnected; reconnecting…", "down");
    } catch (error) {
      setConnection("disconnected (" + error.message + "); reconnecting…", "down");
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// -- the routing playground ----------------------------------------------------------------

function showDecision(prompt, answer) {
  const result = $("route-result");
  const decision = answer.decision;
  const facts = el("dl", {},
    el("dt", { text: "prompt" }), el("dd", {}, el("pre", { class: "prompt", text: prompt })));
  if (decision === null) {
    facts.append(el("dt", { text: "no decision" }),
                 el("dd", { class: "route-error error", text: answer.error }));
  } else {
    facts.append(
      el("dt", { text: "model" }), el("dd", { class: "route-model", text: decision.model }),
      el("dt", { text: "decided by" }), el("dd", { class: "route-plugin", text: decision.plugin }),
      el("dt", { text: "reason" }), el("dd", { class: "route-reason", text: decision.reason }));
  }
  for (const warning of (decision && decision.warnings) || []) {
    facts.append(el("dt", { text: "warning" }), el("dd", { class: "error", text: warning }));
  }
  const signals = el("table", { class: "signals" },
    el("thead", {}, el("tr", {}, el("th", { text: "signal" }), el("th", { text: "value" }),
                                  el("th", { text: "from plugin" }))));
  const signalRows = el("tbody");
  for (const [name, item] of Object.entries(answer.signals)) {
    const value = typeof item.value === "number" && !Number.isInteger(item.value)
      ? item.value.toFixed(3) : JSON.stringify(item.value);
    signalRows.append(el("tr", {}, el("td", { text: name }), el("td", { text: value }),
                         el("td", { text: item.plugin || "" })));
  }
  signals.append(signalRows);
  const trace = el("ol", { class: "trace" });
  for (const step of answer.trace) {
    let text = step.plugin + ": ";
    if (step.error) text += "raised " + step.error + " (skipped)";
    else if (step.model === null) text += "no answer (passes)";
    else text += step.model + (step.reason ? " — " + step.reason : "")
      + (step.decided ? "  ← decided" : "  (not asked: " + (step.skipped || "") + ")");
    trace.append(el("li", { class: step.decided ? "decided" : "", text }));
  }
  if (!answer.trace.some((step) => step.decided)) {
    trace.append(el("li", { class: "decided", text: "no plugin chose: the default model" }));
  }
  result.replaceChildren(facts, el("h3", { text: "Signals" }), signals,
                         el("h3", { text: "Each routing plugin, in the order asked" }), trace);
}

function setupPlayground() {
  $("route-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("prompt").value;
    const result = $("route-result");
    if (!prompt.trim()) { result.replaceChildren(el("p", { class: "error", text: "Type a prompt first." })); return; }
    result.replaceChildren(el("p", { class: "message", text: "routing…" }));
    try {
      const answer = await api("/admin/route", {
        model: "auto", messages: [{ role: "user", content: prompt }] });
      showDecision(prompt, answer);
    } catch (error) {
      result.replaceChildren(el("p", { class: "error", text: error.message }));
    }
  });
}

// -- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setupKeyForm();
  setupPlayground();
  setInterval(tick, 1000);
  setInterval(drawCharts, 2000);
  drawCharts();
  stream();
});
