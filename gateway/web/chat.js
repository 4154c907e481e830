// Chat: streaming generation (fetch + ReadableStream over the NDJSON framing of
// POST /api/model/generate), sampling settings, model + adapter choice, per-message stats, and a
// side-by-side mode. Two sides on the same base model (e.g. base vs a run's adapter) are answered at
// once by that one loaded model, each request naming its own adapter ("none" = the bare base: the
// model server's per-request adapters, batched together); two different models are each loaded,
// then answered, in turn (the model server holds one model).

import { $, api, ApiError, authHeaders, busy, clearError, errorBox, fmtInt, go, h, showError, toast } from "./api.js";
import {
  getModels, isLoaded, loadableGroups, loadModel, onModelStatus, refreshModelStatus, runFolders, waitWhileLoading,
} from "./store.js";

const panes = [];
let controller = null;
let ready = null;

export function init() {
  if (ready) return ready;
  ready = (async () => {
    panes.push(makePane("A"), makePane("B"));
    renderPanes();
    $("#chat-sbs").addEventListener("change", () => {
      $("#chat-b").hidden = !$("#chat-sbs").checked;
      $("#chat-sbs-a-label").hidden = !$("#chat-sbs").checked;
      renderPanes();
    });
    for (const id of ["#chat-model", "#chat-model-b", "#chat-ckpt"]) $(id).addEventListener("change", renderPanes);
    $("#chat-adapter").addEventListener("change", () => onAdapterChange("#chat-adapter", "#chat-model", "#chat-ckpt"));
    $("#chat-adapter-b").addEventListener("change", () => onAdapterChange("#chat-adapter-b", "#chat-model-b", null));
    $("#chat-load").addEventListener("click", (e) => busy(e.currentTarget, "Loading…", async () => {
      const choice = choiceA();
      const status = await loadModel(choice.model, choice.adapter);
      toast(`Loaded ${status.model_name}${status.adapter_file ? ` + ${status.adapter_file}` : ""}`, "ok");
    }, $("#chat-error")));
    $("#chat-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
    $("#chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
    });
    $("#chat-stop").addEventListener("click", () => controller?.abort());
    $("#chat-clear").addEventListener("click", () => {
      for (const pane of panes) { pane.history = []; pane.log.replaceChildren(); }
      clearError($("#chat-error"));
    });
    onModelStatus(renderServer);
    await fillChoices();
  })();
  return ready;
}

export async function show() {
  await fillChoices();
  refreshModelStatus().catch((err) => showError($("#chat-error"), err, "Model server"));
}

/** From the Monitor's "Chat with it": select ``modelName``, load it, open the chat. */
export async function chatWith(modelName) {
  go("chat");
  await init();
  await fillChoices();
  $("#chat-model").value = modelName;
  $("#chat-adapter").value = "";
  await busy($("#chat-load"), "Loading…", async () => {
    await loadModel(modelName, null);
    toast(`Loaded ${modelName}`, "ok");
  }, $("#chat-error"));
  $("#chat-input").focus();
}

function makePane(name) {
  const log = h("div", { class: "pane-log", "data-testid": `chat-log-${name}` });
  const title = h("div", { class: "pane-title" });
  const el = h("section", { class: "pane", "aria-label": `Conversation ${name}`, "aria-live": "polite" }, title, log);
  return { name, el, log, title, history: [] };
}

function renderPanes() {
  const sbs = $("#chat-sbs").checked;
  $("#chat-panes").className = `chat-panes${sbs ? " sbs" : ""}`;
  $("#chat-panes").replaceChildren(...(sbs ? panes : panes.slice(0, 1)).map((p) => p.el));
  panes[0].title.textContent = sbs ? "Left: " + describe(choiceA()) : "";
  panes[1].title.textContent = sbs ? "Right: " + describe(choiceB()) : "";
}

function describe(choice) {
  return choice.model ? `${choice.model}${choice.adapter ? ` + ${choice.adapter}` : ""}` : "(choose a model)";
}

async function fillChoices() {
  let models;
  try {
    models = await getModels(true);
  } catch (err) {
    showError($("#chat-error"), err, "Could not list the models");
    return;
  }
  const groups = loadableGroups(models);
  const runs = runFolders(models);
  for (const [modelSel, adapterSel] of [["#chat-model", "#chat-adapter"], ["#chat-model-b", "#chat-adapter-b"]]) {
    const keepModel = $(modelSel).value;
    const keepAdapter = $(adapterSel).value;
    $(modelSel).replaceChildren(...(groups.length
      ? groups.map((g) => h("optgroup", { label: g.group }, g.entries.map((e) => h("option", { value: e.value }, e.label))))
      : [h("option", { value: "" }, "No models — see the Models view")]));
    $(adapterSel).replaceChildren(h("option", { value: "" }, "none"),
      ...runs.map((r) => h("option", { value: r.value }, r.label)));
    if (keepModel) $(modelSel).value = keepModel;
    if (keepAdapter) $(adapterSel).value = keepAdapter;
    if (!$(modelSel).value && $(modelSel).options.length) $(modelSel).selectedIndex = 0;
  }
  // Right side defaults to a fine-tuned model: the newest published one.
  const published = models.published_models || [];
  if (published.length && !$("#chat-model-b").dataset.touched) {
    const newest = [...published].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)))[0];
    $("#chat-model-b").value = newest.name.startsWith("published/") ? newest.name : `published/${newest.name}`;
  }
  $("#chat-model-b").addEventListener("change", () => { $("#chat-model-b").dataset.touched = "1"; }, { once: true });
  renderPanes();
}

async function onAdapterChange(adapterSel, modelSel, ckptSel) {
  const run = $(adapterSel).value;
  const ckpt = ckptSel && $(ckptSel);
  if (ckpt) {
    ckpt.replaceChildren(h("option", { value: "" }, "best (lowest validation loss)"));
    ckpt.disabled = !run;
  }
  renderPanes();
  if (!run) return;
  try {
    const [data, checkpoints] = await Promise.all([
      api("/api/dashboard/data", { query: { training_dir: run } }),
      api("/api/checkpoints", { query: { training_dir: run } }),
    ]);
    const base = data.training_config?.model_name;
    if (base && [...$(modelSel).options].some((o) => o.value === base)) $(modelSel).value = base;
    if (ckpt) {
      for (const c of [...(checkpoints.checkpoints || [])].sort((a, b) => a.iteration - b.iteration)) {
        ckpt.append(h("option", { value: c.path },
          `iteration ${fmtInt(c.iteration)} · val ${c.validation_loss?.toFixed(4) ?? "—"}${c.is_best ? " · best" : ""}`));
      }
    }
    renderPanes();
  } catch (err) {
    showError($("#chat-error"), err, `Could not read ${run}`);
  }
}

function choiceA() {
  const ckpt = $("#chat-ckpt").value;
  return { model: $("#chat-model").value, adapter: $("#chat-adapter").value ? (ckpt || $("#chat-adapter").value) : null };
}
function choiceB() {
  return { model: $("#chat-model-b").value, adapter: $("#chat-adapter-b").value || null };
}

function sampling() {
  const num = (id) => Number($(id).value);
  return {
    temperature: num("#chat-temperature"), top_p: num("#chat-top_p"),
    max_tokens: Math.round(num("#chat-max_tokens")), repetition_penalty: num("#chat-repetition_penalty"),
  };
}

async function ensureLoaded(choice, status) {
  if (!choice.model) throw new Error("Choose a model first (or install one in the Models view).");
  if (isLoaded(status, choice.model, choice.adapter)) return status;
  toast(`Loading ${describe(choice)}…`);
  return loadModel(choice.model, choice.adapter);
}

async function send() {
  const input = $("#chat-input");
  const prompt = input.value.trim();
  if (!prompt || controller) return;
  const errorEl = $("#chat-error");
  clearError(errorEl);
  input.value = "";
  controller = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  try {
    let status = await waitWhileLoading();
    const sides = [[panes[0], choiceA()], [panes[1], choiceB()]];
    if ($("#chat-sbs").checked && sides[0][1].model && sides[0][1].model === sides[1][1].model) {
      // One base, two adapters: no reload, both streams at once.
      if (!status.loaded || status.model_name !== sides[0][1].model) status = await ensureLoaded({ model: sides[0][1].model, adapter: null }, status);
      const loaded = status;
      await Promise.all(sides.map(([pane, choice]) => {
        pane.title.textContent = `${pane === panes[0] ? "Left" : "Right"}: ${loaded.model_name} + `
          + `${choice.adapter || "no adapter"} (per request)`;
        return converse(pane, prompt, loaded, choice.adapter || "none");
      }));
    } else if ($("#chat-sbs").checked) {
      for (const [pane, choice] of sides) {
        status = await ensureLoaded(choice, status);
        pane.title.textContent = `${pane === panes[0] ? "Left" : "Right"}: ${status.model_name}`
          + `${status.adapter_file ? ` + ${status.adapter_file}` : ""}`;
        await converse(pane, prompt, status);
        if (controller.signal.aborted) break;
      }
    } else {
      if (!status.loaded || status.is_loading) status = await ensureLoaded(choiceA(), status);
      panes[0].title.textContent = `${status.model_name}${status.adapter_file ? ` + ${status.adapter_file}` : ""}`;
      await converse(panes[0], prompt, status);
    }
  } catch (err) {
    if (err.name !== "AbortError" && !err.shown) showError(errorEl, err, "Chat");
  } finally {
    controller = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
    input.focus();
  }
}

/** One streamed turn in ``pane``; ``adapter`` (optional) is this request's own adapter. */
async function converse(pane, prompt, status, adapter = undefined) {
  const system = $("#chat-system").value.trim();
  const history = [...(system ? [{ role: "system", content: system }] : []), ...pane.history];
  pane.log.append(h("div", { class: "msg user" }, prompt));
  const text = h("span", { class: "text" });
  const stats = h("span", { class: "stats-line" }, "waiting for the first token…");
  const bubble = h("div", { class: "msg assistant streaming", "data-testid": "assistant" }, text, stats);
  pane.log.append(bubble);
  pane.el.scrollTop = pane.el.scrollHeight;
  const body = { prompt, history, ...sampling(), streaming: true, is_base_model: status?.model_type === "base" };
  if (adapter !== undefined) body.adapter = adapter;
  const started = performance.now();
  let tokens = 0;
  let final = null;
  try {
    const response = await fetch("/api/model/generate", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      let data = {};
      try { data = await response.json(); } catch { /* not JSON */ }
      throw new ApiError(response.status, data, "/api/model/generate");
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (!line) continue;
        const msg = JSON.parse(line);
        if (msg.done) { final = msg; continue; }
        if (typeof msg.token === "string") {
          tokens += 1;
          text.textContent += msg.token;
          stats.textContent = `${tokens} tokens…`;
          pane.el.scrollTop = pane.el.scrollHeight;
        }
      }
    }
    if (!final) throw new Error("The stream ended without its final line");
    if (final.success === false) throw new ApiError(500, final, "/api/model/generate");
    stats.textContent = [
      `${fmtInt(final.tokens_generated)} tokens`,
      `${final.tokens_per_second?.toFixed(1)} tok/s`,
      final.time_to_first_token !== null && final.time_to_first_token !== undefined
        ? `first token ${final.time_to_first_token.toFixed(2)} s` : null,
      `${final.generation_time_seconds?.toFixed(2)} s`,
      `prompt ${fmtInt(final.prompt_tokens)} tokens`,
      adapter !== undefined ? `adapter ${final.adapter_file || "none"}` : null,
      final.finish_reason,
    ].filter(Boolean).join(" · ");
    bubble.dataset.done = "true";
    pane.history.push({ role: "user", content: prompt }, { role: "assistant", content: final.response ?? text.textContent });
  } catch (err) {
    if (err.name === "AbortError") {
      stats.textContent = `stopped after ${tokens} tokens (${((performance.now() - started) / 1000).toFixed(1)} s)`;
      if (text.textContent) pane.history.push({ role: "user", content: prompt }, { role: "assistant", content: text.textContent });
      throw err;
    }
    stats.replaceChildren(errorBox(err, "Generation failed"));
    err.shown = true;
    throw err;
  } finally {
    bubble.classList.remove("streaming");
  }
}

function renderServer(status) {
  const el = $("#chat-server");
  if (status.is_loading) el.textContent = `Loading ${status.model_name}…`;
  else if (status.loaded) {
    el.textContent = `Loaded: ${status.model_name}${status.adapter_file ? ` + ${status.adapter_file}` : status.adapter_path ? ` + ${status.adapter_path}` : ""}`
      + `${status.model_type ? ` (${status.model_type})` : ""}`;
  } else el.textContent = status.error ? `No model loaded (last error: ${status.error})` : "No model loaded.";
}

