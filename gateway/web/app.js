// The page: views behind #hash links, one Socket.IO connection, health, the API token.

import { $, $$, api, apiToken, errorBox, onUnauthorized, setApiToken, toast } from "./api.js";
import * as chat from "./chat.js";
import * as datasets from "./datasets.js";
import * as models from "./models.js";
import * as monitor from "./monitor.js";
import * as runs from "./runs.js";
import * as train from "./train.js";

const VIEWS = { train, monitor, runs, models, chat, datasets };
const initialised = new Set();

// Errors are never silent: anything unexpected becomes a visible toast.
window.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  toast(errorBox(event.reason, "Unexpected error"), "error");
});
window.addEventListener("error", (event) => {
  if (/ResizeObserver loop/.test(event.message || "")) return;  // benign: a chart resized within a frame
  toast(errorBox(event.error || event.message, "Unexpected error"), "error");
});

function currentView() {
  const name = location.hash.replace(/^#/, "").split("/")[0];
  return VIEWS[name] ? name : "train";
}

async function show() {
  const name = currentView();
  for (const [key] of Object.entries(VIEWS)) $(`#view-${key}`).hidden = key !== name;
  for (const link of $$("nav a[data-view]")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · ForgeLLM`;
  const view = VIEWS[name];
  if (!initialised.has(name)) {
    initialised.add(name);
    await view.init?.();
  }
  await view.show?.();
}

async function refreshHealth() {
  const el = $("#health");
  try {
    const health = await api("/api/health");
    const down = Object.entries(health.components).filter(([, state]) => state === "down").map(([name]) => name);
    el.textContent = down.length ? `degraded: ${down.join(", ")} down` : "healthy";
    el.className = `pill pill-button ${down.length ? "bad" : "ok"}`;
    el.title = Object.entries(health.components).map(([k, v]) => `${k}: ${v}`).join("\n");
  } catch (err) {
    el.textContent = "unreachable";
    el.className = "pill pill-button bad";
    el.title = err.message;
  }
}

function connectSocket() {
  const live = $("#live");
  const socket = window.io({ auth: apiToken() ? { token: apiToken() } : {}, reconnectionDelayMax: 3000 });
  let connectedOnce = false;
  socket.on("connect", () => {
    live.textContent = "live";
    live.className = "pill ok";
    // (Re)subscribe: after a page load, a reconnect or a gateway restart the monitor reloads
    // the whole curve, then follows the live updates.
    monitor.subscribed(socket, connectedOnce);
    if (connectedOnce) refreshHealth();
    connectedOnce = true;
  });
  socket.on("disconnect", () => {
    live.textContent = "reconnecting…";
    live.className = "pill bad";
  });
  socket.on("connect_error", (err) => {
    live.textContent = "offline";
    live.className = "pill bad";
    live.title = err?.message || "";
  });
  socket.on("training_update", (data) => monitor.onUpdate(data));
  socket.on("training_complete", (data) => monitor.onComplete(data));
  socket.on("training_error", (data) => monitor.onError(data));
  socket.on("training_checkpoint", (data) => monitor.onCheckpoint(data));
  return socket;
}

function setupToken() {
  const form = $("#token-form");
  onUnauthorized(() => { form.hidden = false; $("#token-input").focus(); });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiToken($("#token-input").value.trim());
    location.reload();
  });
}

function setupViewer() {
  const dialog = $("#viewer");
  $("#viewer-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
}

setupToken();
setupViewer();
$("#health").addEventListener("click", refreshHealth);
window.addEventListener("hashchange", show);
refreshHealth();
monitor.prepare();
connectSocket();
show();
