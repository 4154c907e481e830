// The page: views behind #hash links, one Socket.IO connection, health, the API token (asked for
// when the gateway answers 401; sent on every request and as Socket.IO's auth).

import { $, $$, api, apiToken, dispatchJobEvent, errorBox, onUnauthorized, request, setApiToken, toast } from "./api.js";
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
    // The server refused the connection itself (not a network failure): with a token required,
    // a missing or wrong one. socket.io does not retry that; a new token reloads the page.
    if (!socket.active) {
      live.textContent = "refused";
      askForToken();
    }
  });
  socket.on("training_update", (data) => monitor.onUpdate(data));
  socket.on("training_complete", (data) => monitor.onComplete(data));
  socket.on("training_error", (data) => monitor.onError(data));
  for (const kind of ["publish_progress", "publish_complete", "publish_error"]) {
    socket.on(kind, (data) => dispatchJobEvent(kind, data));
  }
  socket.on("training_checkpoint", (data) => monitor.onCheckpoint(data));
  return socket;
}

function askForToken() {
  const form = $("#token-form");
  if (!form.hidden) return;
  $("#token-why").textContent = apiToken()
    ? "The token this page sent was refused: enter the right one."
    : "Enter the token the platform was started with (FORGELLM_SECURITY_API_TOKEN).";
  form.hidden = false;
  $("#token-input").focus();
}

function setupToken() {
  const form = $("#token-form");
  const forget = $("#token-forget");
  forget.hidden = !apiToken();
  onUnauthorized(askForToken);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiToken($("#token-input").value.trim(), $("#token-remember").checked);
    location.reload();  // every view and the Socket.IO connection start again with the token
  });
  forget.addEventListener("click", () => {
    setApiToken("");
    location.reload();
  });
}

function setupViewer() {
  const dialog = $("#viewer");
  $("#viewer-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });
}

/** Whether the gateway takes this page's token (or needs none): one guarded call the gateway
 * answers itself. On a 401 nothing else starts (no view, no Socket.IO connection) until the
 * token is given. An unreachable gateway counts as yes: the views and the socket say so and retry. */
async function tokenAccepted() {
  try {
    return (await request("/api/openapi.json")).status !== 401;
  } catch {
    return true;
  }
}

async function start() {
  setupToken();
  setupViewer();
  $("#health").addEventListener("click", refreshHealth);
  refreshHealth();
  monitor.prepare();
  if (!(await tokenAccepted())) {
    $("#live").textContent = "needs token";
    askForToken();
    return;
  }
  window.addEventListener("hashchange", show);
  connectSocket();
  show();
}

start();
