// What several views share: the model catalog, the datasets, the model server's state.

import { api, fmtGb } from "./api.js";

let modelsPromise = null;
let datasetsPromise = null;

/** GET /api/models (cached until refresh). */
export function getModels(refresh = false) {
  if (refresh || !modelsPromise) {
    modelsPromise = api("/api/models");
    modelsPromise.catch(() => { modelsPromise = null; });
  }
  return modelsPromise;
}

/** GET /api/dataset/info (cached until refresh). */
export function getDatasets(refresh = false) {
  if (refresh || !datasetsPromise) {
    datasetsPromise = api("/api/dataset/info");
    datasetsPromise.catch(() => { datasetsPromise = null; });
  }
  return datasetsPromise;
}

/** Models a generation can run on: [{group, entries: [{value, label}]}]. */
export function loadableGroups(models) {
  const entry = (m, value) => ({ value, label: `${m.name} · ${fmtGb(m.size_gb)}${m.type ? ` · ${m.type}` : ""}` });
  return [
    { group: "Published", entries: (models.published_models || []).map((m) => entry(m, publishedName(m))) },
    { group: "Base (models/base)", entries: (models.base_models || []).map((m) => entry(m, m.name)) },
    { group: "Hugging Face cache", entries: (models.cached_models || []).map((m) => entry(m, m.name)) },
  ].filter((g) => g.entries.length);
}

export function publishedName(m) {
  return m.name.startsWith("published/") ? m.name : `published/${m.name}`;
}

/** Run folders (CPT and IFT) as [{value: "models/cpt/x", label, entry}]. */
export function runFolders(models) {
  const runs = [];
  for (const [kind, list] of [["CPT", models.cpt_models], ["IFT", models.ift_models]]) {
    for (const m of list || []) {
      const path = m.path ? `models/${m.path}` : `models/${kind.toLowerCase()}/${m.name}`;
      runs.push({ value: path, label: `${kind} · ${m.name}`, kind, entry: m });
    }
  }
  runs.sort((a, b) => String(b.entry.created_at || "").localeCompare(String(a.entry.created_at || "")));
  return runs;
}

// --- the model server ------------------------------------------------------------------------

const statusListeners = new Set();
let lastStatus = null;

export function onModelStatus(fn) {
  statusListeners.add(fn);
  if (lastStatus) fn(lastStatus);
}

export async function refreshModelStatus() {
  lastStatus = await api("/api/model/status");
  statusListeners.forEach((fn) => fn(lastStatus));
  return lastStatus;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Follow GET /api/model/status until no load is in progress. */
export async function waitWhileLoading() {
  let status = await refreshModelStatus();
  const deadline = Date.now() + 15 * 60 * 1000;
  while (status.is_loading && Date.now() < deadline) {
    await sleep(300);
    status = await refreshModelStatus();
  }
  return status;
}

/** POST /api/model/load, then follow GET /api/model/status until it is loaded (or failed). */
export async function loadModel(modelName, adapterPath) {
  const before = await waitWhileLoading();  // one load at a time (the server answers 409 otherwise)
  if (isLoaded(before, modelName, adapterPath)) return before;
  await api("/api/model/load", { method: "POST", body: { model_name: modelName, adapter_path: adapterPath || null } });
  const deadline = Date.now() + 15 * 60 * 1000;
  for (;;) {
    const status = await refreshModelStatus();
    if (!status.is_loading) {
      if (!status.loaded || status.error) {
        const error = new Error(status.error || `The model server did not load ${modelName}`);
        error.suggestion = "See the inference process's log; GET /api/model/status shows the last error.";
        throw error;
      }
      return status;
    }
    if (Date.now() > deadline) throw new Error(`Still loading ${modelName} after 15 minutes`);
    await sleep(300);
  }
}

/** Whether the loaded model is exactly (model, adapter). */
export function isLoaded(status, modelName, adapterPath) {
  return Boolean(status && status.loaded && !status.is_loading && status.model_name === modelName
    && (status.adapter_path || null) === (adapterPath || null));
}
