// REST calls, the error display every view shares, DOM and number helpers.

// The API token (only when the gateway requires one): kept for this tab's session, or in
// localStorage when the user asks to be remembered; sent as "Authorization: Bearer" on every
// request and as Socket.IO's auth {token}.
const TOKEN_KEY = "forgellm-api-token";
let token = sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";

export function apiToken() { return token; }
export function setApiToken(value, remember = false) {
  token = value;
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  if (value) (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
}
export function authHeaders() { return token ? { Authorization: `Bearer ${token}` } : {}; }

/** A failed request: the server's {error, error_code, details, suggestion} (or a network failure). */
export class ApiError extends Error {
  constructor(status, body, path) {
    super(body?.error || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error_code || (status ? `HTTP_${status}` : "NETWORK");
    this.details = body?.details || {};
    this.suggestion = body?.suggestion || "";
    this.path = path;
  }
}

const unauthorizedListeners = [];
export function onUnauthorized(fn) { unauthorizedListeners.push(fn); }

/** A fresh id for X-Request-ID: the server tags the job's bus events with it (publish_progress). */
export function newRequestId() {
  return [...crypto.getRandomValues(new Uint8Array(8))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// publish_progress / publish_complete / publish_error from Socket.IO, routed by the request id.
const jobListeners = new Map();
export function onJobEvent(requestId, fn) {
  jobListeners.set(requestId, fn);
  return () => jobListeners.delete(requestId);
}
export function dispatchJobEvent(kind, data) {
  jobListeners.get(data?.correlation_id)?.(kind, data);
}

export async function request(path, { method = "GET", body, query, signal, requestId } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") params.set(k, v);
    const qs = params.toString();
    if (qs) url += `?${qs}`;
  }
  const init = { method, headers: { ...authHeaders(), ...(requestId ? { "X-Request-ID": requestId } : {}) }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, {
      error: `Cannot reach the gateway (${method} ${path})`,
      suggestion: "Is the platform running? Start it with 'forgellm start'.",
    }, path);
  }
  return response;
}

/** JSON API call; throws ApiError with the server's error body on any failure. */
export async function api(path, options = {}) {
  const response = await request(path, options);
  let data = null;
  const text = await response.text();
  try { data = text ? JSON.parse(text) : {}; } catch {
    throw new ApiError(response.status, { error: `Unexpected answer from ${path} (not JSON)` }, path);
  }
  if (!response.ok || data.success === false) {
    const error = new ApiError(response.status, data, path);
    if (response.status === 401) unauthorizedListeners.forEach((fn) => fn(error));
    throw error;
  }
  return data;
}

/** Switch to a view (#hash), refreshing it even if it is the current one. */
export function go(view) {
  if (location.hash === `#${view}`) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = view;
}

// --- DOM ------------------------------------------------------------------------------------

/** h("button", {class: "x", onclick: f}, "text", child...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** The error, its code and the server's suggestion, as a box. */
export function errorBox(err, title) {
  let e = err;
  if (!(err instanceof ApiError)) {
    e = new ApiError(0, { error: String(err?.message || err), suggestion: err?.suggestion || "" });
    e.code = err?.code || (err instanceof TypeError ? "CLIENT_ERROR" : "ERROR");
  }
  const field = e.details?.field ? ` (field ${e.details.field})` : "";
  return h("div", { class: "error-box", role: "alert" },
    h("strong", {}, title ? `${title}: ` : ""), e.message + field,
    e.suggestion ? h("p", { class: "suggestion" }, "Suggestion: ", e.suggestion) : null,
    h("div", { class: "code" }, e.code + (e.status ? ` · HTTP ${e.status}` : "") + (e.path ? ` · ${e.path}` : "")));
}

/** Show ``err`` in ``container`` (replacing what it held); null container: a toast. */
export function showError(container, err, title) {
  if (!container) { toast(errorBox(err, title), "error"); return; }
  container.replaceChildren(errorBox(err, title));
}
export function clearError(container) { container?.replaceChildren(); }

export function toast(content, kind = "info", ms = kind === "error" ? 12000 : 5000) {
  const box = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" },
    content instanceof Node ? content : String(content));
  const close = h("button", { class: "close", type: "button", "aria-label": "Dismiss", onclick: () => box.remove() }, "×");
  box.append(close);
  $("#toasts").append(box);
  setTimeout(() => box.remove(), ms);
}

// --- numbers ----------------------------------------------------------------------------------

export function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  return Number(v).toFixed(digits);
}
export function fmtLr(v) {
  if (v === null || v === undefined) return "—";
  return v === 0 ? "0" : Number(v).toExponential(2);
}
export function fmtInt(v) {
  if (v === null || v === undefined) return "—";
  return Math.round(v).toLocaleString("en-US");
}
export function fmtTokens(v) {
  if (v === null || v === undefined) return "—";
  if (v >= 1e9) return `${(v / 1e9).toFixed(2)} B`;
  if (v >= 1e6) return `${(v / 1e6).toFixed(2)} M`;
  if (v >= 1e4) return `${(v / 1e3).toFixed(1)} k`;
  return fmtInt(v);
}
/** A size given in GB (as the API reports them). */
export function fmtGb(gb, digits) {
  if (gb === null || gb === undefined) return "—";
  const bytes = gb * 1024 ** 3;
  const f = (v, d) => (digits ? String(+v.toPrecision(digits + 1)) : v.toFixed(d));
  if (bytes < 1024) return `${Math.round(bytes)} B`;
  if (bytes < 1024 ** 2) return `${f(bytes / 1024, 1)} KB`;
  if (bytes < 1024 ** 3) return `${f(bytes / 1024 ** 2, 1)} MB`;
  return `${f(gb, 2)} GB`;
}
export const fmtMb = (mb) => (mb === null || mb === undefined ? "—" : fmtGb(mb / 1024));
export function fmtEta(minutes) {
  if (minutes === null || minutes === undefined) return "—";
  const s = Math.round(minutes * 60);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
export function fmtDate(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** "models/published/x/README.md" -> "/api/published/x/README.md" */
export function publishedUrl(path) {
  return `/api/published/${String(path).replace(/^models\/published\//, "").split("/").map(encodeURIComponent).join("/")}`;
}

/** Show a published model's .png or .md in the viewer dialog (fetched with the API token). */
export async function openPublished(path, title) {
  const dialog = $("#viewer");
  const bodyEl = $("#viewer-body");
  $("#viewer-title").textContent = title || path;
  bodyEl.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  const url = publishedUrl(path);
  if (!dialog.open) dialog.showModal();
  try {
    const response = await request(url);
    if (!response.ok) {
      let data = {};
      try { data = await response.json(); } catch { /* not JSON */ }
      throw new ApiError(response.status, data, url);
    }
    const blob = await response.blob();
    const objectUrl = URL.createObjectURL(blob);
    $("#viewer-open").href = objectUrl;
    if (path.endsWith(".png")) bodyEl.replaceChildren(h("img", { src: objectUrl, alt: title || "training dashboard" }));
    else bodyEl.replaceChildren(h("pre", {}, await blob.text()));
  } catch (err) {
    bodyEl.replaceChildren(errorBox(err, "Could not open the file"));
  }
}

/** Run ``fn`` with ``button`` disabled and showing ``busyText``; errors go to ``errorEl`` (or a toast). */
export async function busy(button, busyText, fn, errorEl) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = busyText;
  clearError(errorEl);
  try {
    return await fn();
  } catch (err) {
    showError(errorEl, err);
    return undefined;
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}
