// Models: base, cached, CPT, IFT and published models; load one into the model server; import
// a GGUF, pull from the Hub, install the demo model; quantize / export a published model.

import { $, api, busy, clearError, errorBox, fmtDate, fmtGb, go, h, openPublished, showError, toast } from "./api.js";
import { getModels, loadModel, onModelStatus, publishedName, refreshModelStatus } from "./store.js";

export function init() {
  $("#models-refresh").addEventListener("click", () => show());
  $("#server-unload").addEventListener("click", (e) => busy(e.currentTarget, "Unloading…", async () => {
    await api("/api/model/unload", { method: "POST" });
    await refreshModelStatus();
  }, $("#models-error")));
  onModelStatus(renderServer);
  $("#gguf-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const button = event.submitter || $("#gguf-form button[type=submit]");
    const out = $("#gguf-result");
    busy(button, "Importing…", async () => {
      const reply = await api("/api/models/import_gguf", { method: "POST",
        body: { path: $("#gguf-path").value.trim(), name: $("#gguf-name").value.trim() || null } });
      out.replaceChildren(h("div", { class: "ok-box", role: "status" }, reply.message, " — ", h("code", {}, reply.model_name)));
      await show();
    }, out);
  });
  $("#pull-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const button = event.submitter || $("#pull-form button[type=submit]");
    const out = $("#pull-result");
    busy(button, "Pulling… (large models take a while)", async () => {
      const reply = await api("/api/models/pull", { method: "POST", body: { repo_id: $("#pull-repo").value.trim() } });
      out.replaceChildren(h("div", { class: "ok-box", role: "status" }, reply.message, " — ", h("code", {}, reply.model_name)));
      await show();
    }, out);
  });
  $("#fetch-demo").addEventListener("click", (event) => {
    const out = $("#pull-result");
    busy(event.currentTarget, "Installing…", async () => {
      const reply = await api("/api/models/fetch_demo", { method: "POST", body: {} });
      out.replaceChildren(h("div", { class: "ok-box", role: "status" }, reply.message, " — ", h("code", {}, reply.model_name)));
      await show();
    }, out);
  });
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
      h("button", { type: "button", class: "small", onclick: (e) => quantize(e.currentTarget, key) }, "Quantize 4-bit"),
      h("button", { type: "button", class: "small", onclick: (e) => exportGguf(e.currentTarget, key) }, "Export GGUF"));
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

async function quantize(button, name) {
  await busy(button, "Quantizing…", async () => {
    const reply = await api("/api/models/quantize", { method: "POST", body: { model_name: name, bits: 4 } });
    toast(`${reply.message}: ${reply.model_name}`, "ok");
    await show();
  }, $("#models-error"));
}

async function exportGguf(button, name) {
  await busy(button, "Exporting…", async () => {
    const reply = await api("/api/models/export_gguf", { method: "POST", body: { model_name: name } });
    toast(`${reply.message}: ${reply.gguf_path}`, "ok");
  }, $("#models-error"));
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
