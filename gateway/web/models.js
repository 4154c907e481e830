// Models: base, cached, CPT, IFT and published models; load one into the model server; import
// a GGUF, pull from the Hub, install the demo model; quantize / export a published model.

import {
  $, api, busy, clearError, errorBox, fmtDate, fmtGb, fmtMb, go, h, newRequestId, onJobEvent, openPublished, showError,
  toast,
} from "./api.js";
import { getModels, loadModel, onModelStatus, publishedName, refreshModelStatus } from "./store.js";

// Every add/derive action answers only when its job is done (the publisher runs it; the reply is
// the result), so while it runs the card shows an indeterminate progress bar and the time so far.

const FALLBACK_CHOICES = { bits: { enum: [4, 8], default: 4 }, group_size: { enum: [32, 64, 128], default: 64 } };

export function init() {
  $("#models-refresh").addEventListener("click", () => show());
  $("#server-unload").addEventListener("click", (e) => busy(e.currentTarget, "Unloading…", async () => {
    await api("/api/model/unload", { method: "POST" });
    await refreshModelStatus();
  }, $("#models-error")));
  onModelStatus(renderServer);

  $("#gguf-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    runJob(form, form.querySelector("button[type=submit]"), $("#gguf-result"), "Importing the GGUF", async (requestId) => {
      const reply = await api("/api/models/import_gguf", { method: "POST", requestId, body: {
        path: $("#gguf-path").value.trim(), name: $("#gguf-name").value.trim() || null, force: $("#gguf-force").checked,
      } });
      await show();
      return added(reply, reply.model_name);
    });
  });
  $("#pull-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    runJob(form, form.querySelector("button[type=submit]"), $("#pull-result"), "Pulling from the Hub", async (requestId) => {
      const reply = await api("/api/models/pull", { method: "POST", requestId, body: {
        repo_id: $("#pull-repo").value.trim(), revision: $("#pull-revision").value.trim() || null,
      } });
      await show();
      return added(reply, reply.model_name);
    });
  });
  $("#fetch-demo").addEventListener("click", (event) => {
    runJob($("#demo-card"), event.currentTarget, $("#demo-result"), "Installing the demo model", async (requestId) => {
      const reply = await api("/api/models/fetch_demo", { method: "POST", requestId, body: {} });
      await show();
      return added(reply, reply.model_name);
    });
  });
  $("#derive-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const name = $("#derive-model").value;
    runJob(form, $("#derive-quantize"), $("#derive-result"), `Quantizing ${name}`, async () => {
      const reply = await api("/api/models/quantize", { method: "POST", body: {
        model_name: name, bits: Number($("#derive-bits").value), group_size: Number($("#derive-group").value),
      } });
      await show();
      $("#derive-model").value = reply.model_name;
      return added(reply, reply.model_name);
    });
  });
  $("#derive-export").addEventListener("click", (event) => {
    const form = $("#derive-form");
    if (!form.reportValidity()) return;
    const name = $("#derive-model").value;
    runJob(form, event.currentTarget, $("#derive-result"), `Exporting ${name} to GGUF`, async () => {
      const reply = await api("/api/models/export_gguf", { method: "POST", body: { model_name: name } });
      await show();
      return [h("strong", {}, reply.message), " — ", h("code", { class: "wrap-anywhere" }, reply.gguf_path),
        ` (${fmtMb(reply.size_mb)})`];
    });
  });
  fillQuantizeChoices();
}

/** Bits and group sizes from QuantizeRequest in the OpenAPI document (the server's choices). */
async function fillQuantizeChoices() {
  let props = FALLBACK_CHOICES;
  try {
    const doc = await api("/api/openapi.json");
    props = { ...FALLBACK_CHOICES, ...doc.components.schemas.QuantizeRequest?.properties };
  } catch { /* the fallback mirrors schemas/publish.py */ }
  for (const [id, key, unit] of [["#derive-bits", "bits", " bit"], ["#derive-group", "group_size", ""]]) {
    const { enum: choices, default: preset } = props[key]?.enum ? props[key] : FALLBACK_CHOICES[key];
    $(id).replaceChildren(...choices.map((v) => h("option", { value: v, selected: v === preset }, `${v}${unit}`)));
  }
}

/** The success line of an added model, with a button to load it. */
function added(reply, modelName) {
  return [h("strong", {}, reply.message), " — ", h("code", { class: "wrap-anywhere" }, modelName),
    h("div", { class: "row-actions" }, h("button", { type: "button", class: "small",
      onclick: (e) => load(e.currentTarget, modelName, null) }, "Load it"))];
}

/** Run one long request: the button disabled, the card busy, a progress bar and the time so far in
 * ``out``; then the result (what ``fn`` returns) or the server's error, code and suggestion, with the
 * field it names marked invalid and focused. */
async function runJob(card, button, out, what, fn) {
  for (const el of card.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  const started = performance.now();
  const elapsed = h("span", {}, "0 s");
  const stage = h("span", { class: "job-stage" });
  const bar = h("progress", { "aria-label": what });
  out.replaceChildren(h("div", { class: "job", role: "status", "data-state": "running" },
    bar, h("span", {}, `${what}… `, stage, elapsed)));
  // The publisher's stage-by-stage events for this request (publish_progress over Socket.IO).
  const requestId = newRequestId();
  const stopListening = onJobEvent(requestId, (kind, data) => {
    if (kind !== "publish_progress") return;
    bar.max = 1;
    bar.value = Math.max(0, Math.min(1, data.fraction ?? 0));
    stage.textContent = `${data.stage} · `;
  });
  const timer = setInterval(() => { elapsed.textContent = `${Math.round((performance.now() - started) / 1000)} s`; }, 1000);
  const buttons = [...card.querySelectorAll("button")];
  buttons.forEach((b) => { b.disabled = true; });
  card.setAttribute("aria-busy", "true");
  try {
    const content = await fn(requestId);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    out.replaceChildren(h("div", { class: "ok-box", role: "status", "data-state": "done" }, content,
      h("div", { class: "muted small-text" }, `took ${seconds} s`)));
  } catch (err) {
    out.replaceChildren(errorBox(err, `${what} failed`));
    out.firstChild.dataset.state = "failed";
    const field = err?.details?.field;
    const input = field && card.querySelector(`[name="${CSS.escape(field)}"]`);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  } finally {
    stopListening();
    clearInterval(timer);
    buttons.forEach((b) => { b.disabled = false; });
    card.removeAttribute("aria-busy");
  }
}

/** Preselect ``name`` in the quantize/export card and take the keyboard there. */
function derive(name) {
  $("#derive-model").value = name;
  $("#derive-form").scrollIntoView({ block: "nearest" });
  $("#derive-model").focus();
}

export async function show() {
  const errorEl = $("#models-error");
  clearError(errorEl);
  refreshModelStatus().catch((err) => showError($("#server-status"), err, "Model server"));
  let models;
  try {
    models = await getModels(true);
  } catch (err) {
    showError(errorEl, err, "Could not list the models");
    return;
  }
  const sections = [
    ["Base models", "models/base", models.base_models, (m) => m.name, "load"],
    ["Hugging Face cache", "~/.cache/huggingface", models.cached_models, (m) => m.name, "load"],
    ["CPT runs (adapters)", "models/cpt", models.cpt_models, (m) => `models/${m.path || `cpt/${m.name}`}`, "adapter"],
    ["IFT runs (adapters)", "models/ift", models.ift_models, (m) => `models/${m.path || `ift/${m.name}`}`, "adapter"],
    ["Published", "models/published", models.published_models, publishedName, "published"],
  ];
  fillDerive(models.published_models || []);
  $("#models-lists").replaceChildren(...sections.map(([title, where, list, key, kind]) => h("div", { class: "card" },
    h("h2", {}, title, " ", h("span", { class: "muted small-text" }, `${where} · ${list?.length || 0}`)),
    list?.length ? h("div", { class: "table-wrap" }, h("table", { "data-testid": `models-${kind}-${title.split(" ")[0].toLowerCase()}` },
      h("thead", {}, h("tr", {}, ["Name", "Type", "Size", "Created", ""].map((t, i) => h("th", { scope: "col", class: i === 2 ? "num" : "" }, t)))),
      h("tbody", {}, list.map((m) => row(m, key(m), kind))))) : h("p", { class: "muted" }, "None."))));
}

function row(m, key, kind) {
  const actions = [];
  if (kind === "load" || kind === "published") {
    actions.push(h("button", { type: "button", class: "small", "aria-label": `Load ${key}`,
      onclick: (e) => load(e.currentTarget, key, null) }, "Load"));
  }
  if (kind === "adapter") {
    actions.push(h("button", { type: "button", class: "small", "aria-label": `Load ${key} with its base model`,
      onclick: (e) => loadRun(e.currentTarget, key) }, "Load with base model"));
  }
  if (kind === "published") {
    const folder = `models/published/${key.replace(/^published\//, "")}`;
    actions.push(
      h("button", { type: "button", class: "small", onclick: () => openPublished(`${folder}/training_dashboard.png`, `${key} — dashboard`) }, "Dashboard"),
      h("button", { type: "button", class: "small", onclick: () => openPublished(`${folder}/README.md`, `${key} — model card`) }, "Model card"),
      h("button", { type: "button", class: "small", "aria-label": `Quantize or export ${key}`,
        onclick: () => derive(key) }, "Quantize / export…"));
  }
  return h("tr", {},
    h("td", { class: "wrap-anywhere" }, h("strong", {}, m.name), m.path ? h("div", { class: "muted small-text" }, m.path) : null),
    h("td", {}, m.type ? h("span", { class: "tag" }, m.type) : "—"),
    h("td", { class: "num" }, fmtGb(m.size_gb)),
    h("td", {}, fmtDate(m.created_at)),
    h("td", {}, h("div", { class: "row-actions" }, actions)));
}

async function load(button, modelName, adapterPath) {
  await busy(button, "Loading…", async () => {
    const status = await loadModel(modelName, adapterPath);
    toast(`Loaded ${status.model_name}${status.adapter_file ? ` + ${status.adapter_file}` : ""}`, "ok");
  }, $("#models-error"));
}

async function loadRun(button, runPath) {
  await busy(button, "Loading…", async () => {
    const data = await api("/api/dashboard/data", { query: { training_dir: runPath } });
    const base = data.training_config?.model_name;
    if (!base) throw new Error(`${runPath} has no training_config.json naming its base model`);
    const status = await loadModel(base, runPath);
    toast(`Loaded ${status.model_name} + ${status.adapter_file || runPath}`, "ok");
  }, $("#models-error"));
}

function fillDerive(published) {
  const select = $("#derive-model");
  const current = select.value;
  const names = published.map(publishedName);
  select.replaceChildren(...(names.length ? names.map((n) => h("option", { value: n }, n))
    : [h("option", { value: "" }, "No published model yet")]));
  if (names.includes(current)) select.value = current;
}

function renderServer(status) {
  const el = $("#server-status");
  if (status.is_loading) {
    el.replaceChildren(h("span", { class: "badge running" }, "loading"), " ", status.model_name || "");
    return;
  }
  if (!status.loaded) {
    el.replaceChildren(h("span", { class: "badge" }, "no model loaded"),
      status.error ? errorBox({ message: status.error, code: "MODEL_ERROR" }, "Last load failed") : "");
    return;
  }
  el.replaceChildren(h("span", { class: "badge done" }, "loaded"), " ", h("strong", {}, status.model_name),
    status.model_type ? ` · ${status.model_type}` : "",
    status.adapter_path ? h("div", { class: "small-text" }, "adapter: ", h("code", {}, status.adapter_file || status.adapter_path)) : "",
    h("div", { class: "small-text muted" }, `memory ${fmtGb(status.memory_usage_gb)} · ${status.generations_completed} generations`),
    h("div", { class: "row-actions" }, h("button", { type: "button", class: "small primary", onclick: () => go("chat") }, "Chat")));
}
