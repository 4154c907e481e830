// Train: a form built from the server's TrainingStartRequest schema (fields, limits, defaults),
// model and dataset pickers, a learning-rate preview, Start.

import { $, $$, api, clearError, errorBox, fmtGb, fmtInt, fmtLr, fmtMb, fmtTokens, go, h, showError, toast } from "./api.js";
import { cssColor, LineChart } from "./chart.js";
import * as monitor from "./monitor.js";
import { getDatasets, getModels, publishedName } from "./store.js";

const GROUPS = [
  ["Model and data", ["model_name", "dataset", "training_type", "max_iterations", "batch_size", "max_seq_length"]],
  ["Learning rate and optimizer", ["learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "seed"]],
  ["Fine-tuning method", ["fine_tune_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_layers", "lora_targets",
    "grad_checkpoint"]],
  ["Validation, checkpoints, early stopping", ["save_every", "steps_per_eval", "val_batches", "validation_split",
    "early_stopping_patience", "overfitting_threshold", "steps_per_report"]],
  ["Data mixture and resume", ["data_mixture_ratio", "general_dataset", "resume_from"]],
];
// `distributed` is an object: its own fieldset (distributedFields), sent only for several ranks.
const CUSTOM = new Set(["distributed"]);

const HELP = {
  model_name: "A base model, a Hugging Face cache entry or a published model.",
  dataset: "A folder under dataset/.",
  training_type: "cpt: continued pre-training on text; ift: instruction tuning on chat data.",
  max_iterations: "Optimizer updates.",
  batch_size: "Rows per update.",
  max_seq_length: "Tokens per row (CPT packs documents into rows).",
  learning_rate: "Peak learning rate after warm-up.",
  lr_schedule: "Decay after warm-up to 10 % of the peak at the last iteration, or constant.",
  warmup_steps: "Linear warm-up from 0.",
  weight_decay: "AdamW weight decay.",
  seed: "Data order, initialisation and dropout.",
  fine_tune_type: "LoRA / DoRA adapters, or every weight.",
  lora_rank: "Adapter rank.",
  lora_alpha: "Scale = alpha / rank.",
  lora_dropout: "Dropout on the adapter input.",
  lora_layers: "Last N blocks (-1 = all).",
  lora_targets: "Module keys, comma-separated; empty = every linear layer.",
  grad_checkpoint: "Recompute activations: less memory, slower.",
  save_every: "Checkpoint every N iterations.",
  steps_per_eval: "Validate every N iterations.",
  val_batches: "Held-out batches per validation.",
  validation_split: "Share of documents held out.",
  early_stopping_patience: "Evaluations above the best before stopping (0 = never).",
  overfitting_threshold: "Relative rise over the best validation loss that counts.",
  steps_per_report: "Report (chart point) every N iterations.",
  data_mixture_ratio: "Share of rows from your dataset; the rest from the general dataset or self-generated text.",
  general_dataset: "Rehearsal data for the other share (none: text the base model writes itself).",
  resume_from: "A checkpoint file or a run folder (its latest checkpoint).",
  "distributed-processes": "Ranks on each host (1 with no hosts: one process, as usual).",
  "distributed-hosts": "IP addresses, comma-separated, this machine first; empty: this machine only.",
  "distributed-backend": "auto: NCCL on CUDA, ring elsewhere.",
  "distributed-hostfile": "An mlx.launch hostfile in the workspace, instead of hosts.",
};

let schema = null;
let lrChart = null;
let datasets = [];
let modelSizes = new Map();

const humanize = (name) => name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase())
  .replace(/\blr\b/i, "LR").replace(/^Lora\b/, "LoRA");

export async function init() {
  lrChart = new LineChart($("#lr-preview"), {
    series: [{ label: "lr", color: cssColor("--train") }], height: 170, fmt: fmtLr,
  });
  $("#train-form").addEventListener("submit", (event) => { event.preventDefault(); start(); });
  $("#train-reset").addEventListener("click", () => { buildForm(); });
  $("#train-form").addEventListener("input", onInput);
  $("#train-form").addEventListener("change", onInput);
  try {
    const doc = await api("/api/openapi.json");
    schema = doc.components.schemas.TrainingStartRequest;
  } catch (err) {
    showError($("#train-fields"), err, "Could not read the training schema");
    return;
  }
  await buildForm();
}

export async function show() {
  lrChart?.resize();
}

/** Pre-select a dataset (from the Datasets view). */
export function useDataset(name) {
  const select = $("#f-dataset");
  if (select) { select.value = name; onInput(); }
}

async function buildForm() {
  if (!schema) return;
  const props = schema.properties;
  const placed = new Set([...GROUPS.flatMap(([, names]) => names), ...CUSTOM]);
  const groups = [...GROUPS, ["Other", Object.keys(props).filter((n) => !placed.has(n))]];
  const fieldsets = groups.filter(([, names]) => names.some((n) => props[n])).map(([title, names]) =>
    h("fieldset", {}, h("legend", {}, title),
      h("div", { class: "fields" }, names.filter((n) => props[n]).map((n) => field(n, props[n])))));
  if (props.distributed) fieldsets.push(distributedFields());
  $("#train-fields").replaceChildren(...fieldsets);
  await Promise.all([fillModels(), fillDatasets()]);
  onInput();
}

function field(name, prop) {
  const id = `f-${name}`;
  const required = (schema.required || []).includes(name);
  const hint = HELP[name] ? h("p", { class: "hint", id: `hint-${name}` }, HELP[name]) : null;
  const error = h("p", { class: "field-error", id: `err-${name}`, "aria-live": "polite" });
  const describedBy = `${hint ? `hint-${name} ` : ""}err-${name}`;
  const label = h("label", { for: id }, humanize(name), required ? " *" : "", " ", h("code", { class: "name" }, name));
  const type = prop.type || (prop.anyOf ? prop.anyOf.find((t) => t.type !== "null")?.type : undefined);
  let input;
  if (name === "model_name" || name === "dataset" || name === "general_dataset") {
    input = h("select", { id, name, "aria-describedby": describedBy, required }, h("option", { value: "" }, "Loading…"));
  } else if (prop.enum) {
    input = h("select", { id, name, "aria-describedby": describedBy },
      prop.enum.map((v) => h("option", { value: v, selected: v === prop.default }, v)));
  } else if (type === "boolean") {
    input = h("input", { id, name, type: "checkbox", "aria-describedby": describedBy, checked: prop.default === true });
    input.dataset.kind = "boolean";
    return h("div", { class: "field check" }, h("label", { for: id }, input, humanize(name), " ",
      h("code", { class: "name" }, name)), hint, error);
  } else if (type === "integer" || type === "number") {
    const min = prop.minimum ?? prop.exclusiveMinimum;
    const max = prop.maximum ?? prop.exclusiveMaximum;
    input = h("input", {
      id, name, type: "number", inputmode: type === "integer" ? "numeric" : "decimal",
      step: type === "integer" ? "1" : "any", min, max, value: prop.default ?? "", "aria-describedby": describedBy,
    });
  } else if (type === "array") {
    input = h("input", { id, name, type: "text", value: (prop.default || []).join(", "), "aria-describedby": describedBy,
      placeholder: "all linear layers" });
  } else {
    input = h("input", { id, name, type: "text", value: prop.default ?? "", "aria-describedby": describedBy,
      placeholder: prop.default === null ? "(none)" : "" });
  }
  input.dataset.kind = prop.enum ? "enum" : type || "string";
  input.dataset.nullable = String(Boolean(prop.anyOf));
  return h("div", { class: "field" }, label, input, hint, error);
}

/** Several processes or machines: the fields of `distributed` (README: Training on several
 * machines). They carry data-dist, not a name, so values() sends them as one object. */
function distributedFields() {
  const one = (key, input) => {
    const id = `f-distributed-${key}`;
    Object.assign(input, { id });
    input.dataset.dist = key;
    input.setAttribute("aria-describedby", `hint-distributed-${key} err-distributed-${key}`);
    return h("div", { class: "field" },
      h("label", { for: id }, humanize(key), " ", h("code", { class: "name" }, `distributed.${key}`)), input,
      h("p", { class: "hint", id: `hint-distributed-${key}` }, HELP[`distributed-${key}`]),
      h("p", { class: "field-error", id: `err-distributed-${key}`, "aria-live": "polite" }));
  };
  return h("fieldset", {}, h("legend", {}, "Several processes or machines"),
    h("div", { class: "fields" },
      one("processes", h("input", { type: "number", min: 1, max: 64, step: "1", value: 1, inputmode: "numeric" })),
      one("hosts", h("input", { type: "text", placeholder: "this machine only" })),
      one("backend", h("select", {}, ["auto", "ring", "nccl", "mpi"].map((v) => h("option", { value: v }, v)))),
      one("hostfile", h("input", { type: "text", placeholder: "(none)" }))),
    h("p", { class: "small-text", id: "world-size", "aria-live": "polite" }));
}

/** The request's `distributed`, or undefined for one process. */
function distributedValue() {
  const get = (key) => $(`#f-distributed-${key}`)?.value.trim() || "";
  const processes = Number(get("processes") || 1);
  const hosts = get("hosts").split(",").map((s) => s.trim()).filter(Boolean);
  const hostfile = get("hostfile");
  if (processes <= 1 && !hosts.length && !hostfile) return undefined;
  const spec = { processes };
  if (hosts.length) spec.hosts = hosts;
  if (get("backend") !== "auto") spec.backend = get("backend");
  if (hostfile) { spec.hostfile = hostfile; delete spec.hosts; }
  return spec;
}

/** The world-size rule, as you type: the global batch must split evenly between the ranks. */
function checkWorldSize(v) {
  const note = $("#world-size");
  const slot = $("#err-distributed-processes");
  const batch = $("#f-batch_size");
  if (!note || !slot) return true;
  const spec = v.distributed;
  const world = spec ? (spec.hostfile ? null : spec.processes * Math.max(1, spec.hosts?.length || 1)) : 1;
  let ok = true;
  if (!spec) note.textContent = "One process.";
  else if (world === null) note.textContent = "World size: as many ranks as the hostfile lists.";
  else {
    ok = !(v.batch_size >= 1) || v.batch_size % world === 0;
    note.textContent = `World size ${world}: each rank trains on ${ok && v.batch_size ? v.batch_size / world : "?"} `
      + `of the ${v.batch_size || "?"} rows of every batch.`;
  }
  slot.textContent = ok ? "" : `batch_size ${v.batch_size} does not divide by the world size ${world}: `
    + `use a multiple of ${world}.`;
  for (const el of [$("#f-distributed-processes"), batch]) {
    if (el && !ok) el.setAttribute("aria-invalid", "true");
    else if (el) el.removeAttribute("aria-invalid");
  }
  return ok;
}

async function fillModels() {
  const select = $("#f-model_name");
  if (!select) return;
  try {
    const models = await getModels(true);
    modelSizes = new Map();
    const group = (label, list, value) => (list?.length ? h("optgroup", { label },
      list.map((m) => {
        modelSizes.set(value(m), m);
        return h("option", { value: value(m) }, `${m.name} · ${fmtGb(m.size_gb)}${m.type ? ` · ${m.type}` : ""}`);
      })) : null);
    const groups = [
      group("Base models (models/base)", models.base_models, (m) => m.name),
      group("Hugging Face cache", models.cached_models, (m) => m.name),
      group("Published", models.published_models, publishedName),
    ].filter(Boolean);
    select.replaceChildren(...(groups.length ? groups : [h("option", { value: "" }, "No models — see the Models view")]));
  } catch (err) {
    select.replaceChildren(h("option", { value: "" }, "Could not list models"));
    $("#err-model_name").textContent = `${err.message} ${err.suggestion || ""}`;
  }
}

async function fillDatasets() {
  const select = $("#f-dataset");
  const general = $("#f-general_dataset");
  try {
    datasets = (await getDatasets(true)).datasets || [];
    const options = () => datasets.map((d) => h("option", { value: d.name },
      `${d.name} · ${fmtMb(d.total_size_mb)} · ~${fmtTokens(d.estimated_tokens)} tokens`));
    if (select) select.replaceChildren(...(datasets.length ? options() : [h("option", { value: "" }, "No datasets in dataset/")]));
    if (general) general.replaceChildren(h("option", { value: "" }, "(none: self-synthesized rehearsal)"), ...options());
  } catch (err) {
    if (select) select.replaceChildren(h("option", { value: "" }, "Could not list datasets"));
    $("#err-dataset").textContent = `${err.message} ${err.suggestion || ""}`;
  }
}

function values() {
  const body = {};
  for (const input of $$("#train-fields [name]")) {
    const { kind, nullable } = input.dataset;
    const raw = input.value.trim();
    let value;
    if (kind === "boolean") value = input.checked;
    else if (kind === "integer") value = raw === "" ? null : Number(raw);
    else if (kind === "number") value = raw === "" ? null : Number(raw);
    else if (kind === "array") value = raw ? raw.split(",").map((s) => s.trim()).filter(Boolean) : [];
    else value = raw === "" && nullable === "true" ? null : raw;
    body[input.name] = value;
  }
  const distributed = distributedValue();
  if (distributed) body.distributed = distributed;
  return body;
}

function onInput() {
  const v = values();
  drawSchedule(v);
  checkWorldSize(v);
  const d = datasets.find((x) => x.name === v.dataset);
  $("#dataset-detail").replaceChildren(d
    ? h("div", {}, h("strong", {}, d.name), h("br"),
      `${fmtInt(d.file_count)} files · ${fmtMb(d.total_size_mb)}`, h("br"),
      `~${fmtTokens(d.estimated_tokens)} tokens `, h("span", { class: "small-text" }, `(${d.token_method || "estimate"})`),
      v.batch_size && v.max_seq_length && v.max_iterations
        ? h("p", { class: "small-text" }, `This run reads up to ${fmtTokens(v.batch_size * v.max_seq_length * v.max_iterations)} tokens`
          + ` (≈ ${((v.batch_size * v.max_seq_length * v.max_iterations) / Math.max(1, d.estimated_tokens)).toFixed(1)} passes).`)
        : null)
    : "—");
  const m = modelSizes.get(v.model_name);
  $("#model-detail").replaceChildren(m ? h("div", {}, h("strong", {}, m.name), h("br"),
    `${fmtGb(m.size_gb)}${m.type ? ` · ${m.type}` : ""}${m.path ? ` · ${m.path}` : ""}`) : "—");
}

/** services/training/schedule.py, in JavaScript. */
export function learningRateAt(step, { peak, schedule, warmup, max }) {
  if (warmup > 0 && step <= warmup) return (peak * step) / warmup;
  if (schedule === "constant") return peak;
  const span = Math.max(1, max - warmup);
  const progress = Math.min(1, Math.max(0, (step - warmup) / span));
  if (schedule === "linear") return peak * (1 - 0.9 * progress);
  return peak * (0.1 + 0.9 * 0.5 * (1 + Math.cos(Math.PI * progress)));
}

function drawSchedule(v) {
  const peak = v.learning_rate;
  const max = v.max_iterations;
  const warmup = v.warmup_steps || 0;
  if (!(peak > 0) || !(max >= 1)) {
    $("#lr-summary").textContent = "Set a learning rate and max iterations to see the schedule.";
    return;
  }
  const steps = new Set([1, max, Math.min(warmup, max)]);
  const n = Math.min(max, 400);
  for (let i = 0; i <= n; i++) steps.add(Math.max(1, Math.round((i / n) * max)));
  const xs = [...steps].filter((s) => s >= 1).sort((a, b) => a - b);
  const opts = { peak, schedule: v.lr_schedule, warmup, max };
  lrChart.setData([xs, xs.map((s) => learningRateAt(s, opts))]);
  $("#lr-summary").textContent = `${warmup ? `Warm-up to ${fmtLr(peak)} over ${fmtInt(warmup)} steps, then ` : ""}`
    + (v.lr_schedule === "constant" ? `constant ${fmtLr(peak)}.` : `${v.lr_schedule} decay to ${fmtLr(peak * 0.1)} at iteration ${fmtInt(max)}.`);
}

async function start() {
  const button = $("#train-start");
  const errorEl = $("#train-error");
  clearError(errorEl);
  for (const el of $$("#train-fields .field-error")) el.textContent = "";
  for (const el of $$("#train-fields [aria-invalid]")) el.removeAttribute("aria-invalid");
  const body = values();
  if (!checkWorldSize(body)) {
    $("#f-distributed-processes").focus();
    return;
  }
  button.disabled = true;
  $("#train-busy").textContent = "Checking the dataset and starting…";
  try {
    const reply = await api("/api/training/start", { method: "POST", body });
    toast(`Started ${reply.training_id}`, "ok");
    errorEl.replaceChildren(h("div", { class: "ok-box", role: "status" }, reply.message, " — ", h("code", {}, reply.output_dir)));
    await monitor.loadCurrent();
    go("monitor");
  } catch (err) {
    // distributed.hosts[1] -> the hosts field (#f-distributed-hosts)
    const name = (err.details?.field || (err.code === "MODEL_NOT_FOUND" ? "model_name" : ""))
      .replace(/\[\d+\]$/, "").replace(/^distributed\./, "distributed-") || null;
    const input = name && $(`#f-${CSS.escape(name)}`);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      const slot = $(`#err-${CSS.escape(name)}`);
      slot.textContent = err.details?.reason || err.message;
      input.focus();
      input.scrollIntoView({ block: "center" });
    }
    errorEl.replaceChildren(errorBox(err, "Could not start training"));
  } finally {
    button.disabled = false;
    $("#train-busy").textContent = "";
  }
}
