// Runs: every CPT/IFT run with status and best validation loss; compare loss curves; open a
// published model's dashboard PNG and model card.

import {
  $, $$, api, clearError, errorBox, fmtDate, fmtGb, fmtInt, fmtNum, h, openPublished, publishedUrl, request, showError,
} from "./api.js";
import { LineChart, PALETTE } from "./chart.js";
import * as monitor from "./monitor.js";
import { getModels, runFolders } from "./store.js";

const details = new Map(); // run path -> {dashboard, checkpoints, error}
const cards = new Map(); // published folder -> its README.md text
// services/publishing/job.py names a published model <run name without _seqN_date>_<iteration>_<time>.
const RUN_SUFFIX = /_seq\d+_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}(_\d+)?$/;
const bare = (name) => name.replace(/^published\//, "");

async function cardOf(folder) {
  if (!cards.has(folder)) {
    cards.set(folder, request(publishedUrl(`models/published/${folder}/README.md`))
      .then((r) => (r.ok ? r.text() : null)).catch(() => null));
  }
  return cards.get(folder);
}

/** The published models of a run: same name stem, and the model card names the run's training id. */
async function publishedOf(runName, trainingId, published) {
  const stem = runName.replace(RUN_SUFFIX, "");
  const candidates = published.filter((p) => bare(p.name).startsWith(`${stem}_`));
  if (!trainingId) return candidates;
  const checked = await Promise.all(candidates.map(async (p) => {
    const card = await cardOf(bare(p.name));
    return card === null || card.includes(`\`${trainingId}\``) ? p : null;
  }));
  return checked.filter(Boolean);
}
let compareChart = null;

export function init() {
  $("#runs-refresh").addEventListener("click", () => { details.clear(); cards.clear(); refresh(); });
  $("#runs-compare").addEventListener("click", compare);
}

export function show() { return refresh(); }

async function loadDetail(path) {
  if (details.has(path)) return details.get(path);
  const detail = {};
  try {
    const [dashboard, checkpoints] = await Promise.all([
      api("/api/dashboard/data", { query: { training_dir: path } }),
      api("/api/checkpoints", { query: { training_dir: path } }),
    ]);
    Object.assign(detail, { dashboard, checkpoints });
  } catch (err) {
    detail.error = err;
  }
  details.set(path, detail);
  return detail;
}

function statusOf(detail, current, path) {
  if (current?.output_dir === path && current.is_training) return ["running", "running"];
  const rows = detail.dashboard?.training_data || [];
  const last = rows.length ? Math.max(...rows.map((r) => r.iteration)) : 0;
  const max = detail.dashboard?.training_config?.max_iterations;
  if (current?.output_dir === path && current.phase && current.phase !== "idle") return [current.phase, "done"];
  if (!rows.length) return ["no data", ""];
  if (max && last >= max) return ["completed", "done"];
  return [`stopped at ${fmtInt(last)}`, ""];
}

async function refresh() {
  const errorEl = $("#runs-error");
  clearError(errorEl);
  let models;
  let current = null;
  try {
    [models, current] = await Promise.all([getModels(true), api("/api/training/status").catch(() => null)]);
  } catch (err) {
    showError(errorEl, err, "Could not list the runs");
    return;
  }
  const runs = runFolders(models);
  if (!runs.length) {
    $("#runs-table").replaceChildren(h("p", { class: "muted" }, "No runs yet — start one in ", h("a", { href: "#train" }, "Train"), "."));
    return;
  }
  // A running run's numbers change: read it again.
  if (current?.output_dir) details.delete(current.output_dir);
  const loaded = [];
  for (let i = 0; i < runs.length; i += 4) {
    loaded.push(...await Promise.all(runs.slice(i, i + 4).map((r) => loadDetail(r.value))));
  }
  const published = models.published_models || [];
  const pubsOf = await Promise.all(runs.map((r, i) => publishedOf(r.value.split("/").pop(),
    loaded[i].dashboard?.training_config?.training_id, published)));
  const body = runs.map((r, i) => {
    const detail = loaded[i];
    const name = r.value.split("/").pop();
    const best = detail.checkpoints?.checkpoints?.find((c) => c.is_best);
    const [status, cls] = detail.error ? ["unreadable", "failed"] : statusOf(detail, current, r.value);
    const pubs = pubsOf[i];
    const config = detail.dashboard?.training_config || {};
    return h("tr", {},
      h("td", {}, h("input", { type: "checkbox", class: "run-pick", value: r.value, "aria-label": `Compare ${name}`,
        onchange: updateCompareButton })),
      h("td", { class: "wrap-anywhere" }, h("strong", {}, name), h("br"),
        h("span", { class: "muted small-text" }, `${r.kind} · ${config.model_name || "?"} on ${config.dataset || "?"}`)),
      h("td", {}, h("span", { class: `badge ${cls}` }, status),
        detail.error ? errorBox(detail.error) : null),
      h("td", { class: "num" }, best ? `${fmtNum(best.validation_loss)} @ ${fmtInt(best.iteration)}` : "—"),
      h("td", { class: "num" }, fmtGb(r.entry.size_gb)),
      h("td", {}, fmtDate(r.entry.created_at)),
      h("td", {}, pubs.length ? pubs.map((p) => {
        const folder = `models/published/${p.name.replace(/^published\//, "")}`;
        return h("div", { class: "row-actions" },
          h("span", { class: "small-text wrap-anywhere" }, p.name.replace(/^published\//, "")),
          h("button", { type: "button", class: "small", onclick: () => openPublished(`${folder}/training_dashboard.png`, `${p.name} — dashboard`) }, "Dashboard"),
          h("button", { type: "button", class: "small", onclick: () => openPublished(`${folder}/README.md`, `${p.name} — model card`) }, "Model card"));
      }) : h("span", { class: "muted" }, "—")),
      h("td", {}, h("button", { type: "button", class: "small", onclick: () => monitor.openRun(r.value) }, "Open")));
  });
  $("#runs-table").replaceChildren(h("table", { "data-testid": "runs" },
    h("thead", {}, h("tr", {}, ["", "Run", "Status", "Best val loss", "Size", "Created", "Published", ""].map((t, i) =>
      h("th", { scope: "col", class: i === 3 || i === 4 ? "num" : "" }, t)))),
    h("tbody", {}, body)));
  updateCompareButton();
}

function updateCompareButton() {
  $("#runs-compare").disabled = $$(".run-pick:checked").length < 2;
}

async function compare() {
  const picked = $$(".run-pick:checked").map((el) => el.value);
  const card = $("#runs-compare-card");
  card.hidden = false;
  const loaded = await Promise.all(picked.map(loadDetail));
  const failed = loaded.map((d, i) => [d, picked[i]]).filter(([d]) => d.error);
  if (failed.length) showError($("#runs-error"), failed[0][0].error, `Could not read ${failed[0][1]}`);
  const xs = [...new Set(loaded.flatMap((d) => (d.dashboard?.training_data || []).map((r) => r.iteration)))].sort((a, b) => a - b);
  const series = [];
  const columns = [];
  picked.forEach((path, i) => {
    const rows = new Map((loaded[i].dashboard?.training_data || []).map((r) => [r.iteration, r]));
    const color = PALETTE[i % PALETTE.length];
    const name = path.split("/").pop();
    series.push({ label: `${name} train`, color }, { label: `${name} val`, color, dash: [6, 4], points: true });
    columns.push(xs.map((x) => rows.get(x)?.training_loss ?? null), xs.map((x) => rows.get(x)?.validation_loss ?? null));
  });
  compareChart?.destroy();
  compareChart = new LineChart($("#chart-compare"), { series, height: 320, yLabel: "loss" });
  compareChart.setData([xs, ...columns]);
  card.scrollIntoView({ block: "nearest" });
}
