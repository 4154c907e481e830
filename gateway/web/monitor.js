// Monitor: the run's whole history from GET /api/dashboard/data, then live Socket.IO updates
// (no polling); the checkpoints table follows `training_checkpoint` events; Stop, Publish.

import {
  $, api, busy, clearError, errorBox, fmtEta, fmtGb, fmtInt, fmtLr, fmtMb, fmtNum, fmtTokens, go, h,
  newRequestId, onJobEvent, openPublished, showError, toast,
} from "./api.js";
import { cssColor, LineChart } from "./chart.js";
import { getModels, runFolders } from "./store.js";

const run = {
  dir: null, id: null, config: null, rows: new Map(), checkpoints: [], lastVal: null,
  phase: "idle", isTraining: false, stopping: false,
};
const charts = {};
let socket = null;
let loading = null;
const buffered = [];
let sizesTimer = null;

export function prepare() {
  charts.loss = new LineChart($("#chart-loss"), {
    series: [
      { label: "train", color: cssColor("--train") },
      { label: "validation", color: cssColor("--val"), points: true },
      { label: "checkpoint", color: cssColor("--ckpt"), points: "only", fill: "transparent", size: 12 },
      { label: "best", color: cssColor("--best"), points: "only", size: 9 },
    ],
    height: 280, yLabel: "loss",
  });
  charts.lr = new LineChart($("#chart-lr"), { series: [{ label: "lr", color: cssColor("--train") }], fmt: fmtLr, ySize: 72 });
  charts.tps = new LineChart($("#chart-tps"), { series: [{ label: "tokens/s", color: cssColor("--ok") }] });
  charts.mem = new LineChart($("#chart-mem"), {
    series: [{ label: "memory", color: cssColor("--ckpt") }], fmt: fmtGb, yTick: (v, digits) => (v ? fmtGb(v, digits) : "0"), ySize: 76,
  });
  $("#mon-stop").addEventListener("click", stop);
}

export function show() {
  for (const chart of Object.values(charts)) chart.resize();
}

/** Called on every Socket.IO (re)connection: subscribe, then load the whole run again. */
export function subscribed(sock) {
  socket = sock;
  socket.emit("subscribe_training", {}, (ack) => {
    if (ack && ack.success === false) showError($("#mon-error"), { message: ack.error }, "Subscription refused");
  });
  return loadCurrent();
}

/** The trainer's current (or last) run, its whole curve, its checkpoints. */
export function loadCurrent() {
  if (loading) return loading;
  loading = (async () => {
    try {
      const status = await api("/api/training/status");
      if (status.output_dir) await loadRun(status.output_dir, status);
      else {
        // The trainer restarted (it forgets finished runs): show the newest run on disk.
        const newest = runFolders(await getModels(true))[0];
        if (newest) await loadRun(newest.value, null);
        else renderEmpty();
      }
      applyStatus(status);
    } catch (err) {
      showError($("#mon-error"), err, "Could not load the training status");
    } finally {
      loading = null;
    }
    for (const event of buffered.splice(0)) (event.kind === "checkpoint" ? onCheckpoint : onUpdate)(event.data);
  })();
  return loading;
}

/** Show a run's history: from the Runs view, or the current run. */
export async function openRun(dir) {
  let status = null;
  try {
    status = await api("/api/training/status");
  } catch { /* shown below if the run cannot be read either */ }
  try {
    await loadRun(dir, status && status.output_dir === dir ? status : null);
    if (status && status.output_dir === dir) applyStatus(status);
    clearError($("#mon-error"));
  } catch (err) {
    showError($("#mon-error"), err, `Could not load ${dir}`);
  }
  go("monitor");
}

async function loadRun(dir, status) {
  const data = await api("/api/dashboard/data", { query: { training_dir: dir } });
  const id = status?.training_id || data.training_config?.training_id || null;
  if (id !== run.id || dir !== run.dir) clearError($("#mon-error"));  // errors of another run
  run.dir = dir;
  run.config = data.training_config || {};
  run.id = id;
  run.rows = new Map();
  run.lastVal = null;
  for (const row of data.training_data || []) upsert(row, row.validation_loss !== null && row.validation_loss !== undefined);
  run.isTraining = Boolean(status?.is_training);
  run.phase = status?.phase || (run.isTraining ? "training" : finishedPhase());
  await refreshCheckpoints();
  renderHeader();
  renderCharts();
  const last = [...run.rows.values()].filter((r) => r.training_loss !== null && r.training_loss !== undefined).at(-1);
  if (last) renderCards({ ...last, progress_percentage: progressOf(last.iteration) });
}

function finishedPhase() {
  const lastIteration = Math.max(0, ...run.rows.keys());
  if (!run.config?.max_iterations) return "finished";
  return lastIteration >= run.config.max_iterations ? "completed" : `stopped at ${lastIteration}`;
}

function progressOf(iteration) {
  const max = run.config?.max_iterations;
  return max ? Math.min(100, (100 * iteration) / max) : 0;
}

function upsert(point, withVal) {
  const row = run.rows.get(point.iteration) || { iteration: point.iteration };
  for (const key of ["training_loss", "learning_rate", "tokens_per_second", "memory_usage_gb"]) {
    if (point[key] !== null && point[key] !== undefined) row[key] = point[key];
  }
  if (withVal && point.validation_loss !== null && point.validation_loss !== undefined) {
    row.validation_loss = point.validation_loss;
    run.lastVal = point.validation_loss;
  }
  run.rows.set(point.iteration, row);
}

function isEval(update) {
  const c = run.config;
  const it = update.iteration;
  if (update.validation_loss === null || update.validation_loss === undefined) return false;
  if (c && c.steps_per_eval && c.save_every) {
    return it % c.steps_per_eval === 0 || it % c.save_every === 0 || it === c.max_iterations;
  }
  return update.validation_loss !== run.lastVal;
}

// --- Socket.IO events ---------------------------------------------------------------------------

export function onUpdate(update) {
  if (loading) { buffered.push({ kind: "update", data: update }); return; }
  if (!update || update.training_id !== run.id) {
    // A run we do not show yet (a new one, or the page just loaded): load it whole.
    if (update && update.training_id) loadCurrent();
    return;
  }
  if (update.phase) run.phase = update.phase;
  if (!update.snapshot) run.isTraining = true;
  renderCards(update);
  if (update.snapshot) { renderHeader(); return; }
  if (update.training_loss !== null && update.training_loss !== undefined) {
    upsert(update, isEval(update));
    renderCharts();
  }
  renderHeader();
}

/** `training_checkpoint`: a checkpoint is on disk. Added to the table and the loss chart at once,
 * ranked like the catalog ranks them (lowest validation loss first, the later one on a tie); the
 * file sizes are read afterwards from GET /api/checkpoints (at most twice a second). */
export function onCheckpoint(event) {
  if (loading) { buffered.push({ kind: "checkpoint", data: event }); return; }
  if (!event || event.training_id !== run.id || !run.dir) {
    if (event && event.training_id) loadCurrent();
    return;
  }
  const file = String(event.path || "").split(/[\\/]/).pop();
  const known = run.checkpoints.find((c) => c.iteration === event.iteration);
  const entry = {
    ...(known || { size_mb: null }),
    iteration: event.iteration,
    path: known?.path || `${run.dir}/${file}`,
    validation_loss: event.validation_loss ?? known?.validation_loss ?? null,
  };
  run.checkpoints = [...run.checkpoints.filter((c) => c.iteration !== event.iteration), entry];
  rank(run.checkpoints);
  renderCheckpoints();
  renderCharts();
  // At most one re-read per half second, however fast checkpoints come.
  sizesTimer ??= setTimeout(() => {
    sizesTimer = null;
    if (!loading) refreshCheckpoints({ keepLive: true }).then(renderCharts);
  }, 500);
}

function rank(checkpoints) {
  const scored = checkpoints.filter((c) => c.validation_loss !== null && c.validation_loss !== undefined)
    .sort((a, b) => a.validation_loss - b.validation_loss || b.iteration - a.iteration);
  for (const c of checkpoints) { c.rank = null; c.is_best = false; }
  scored.forEach((c, i) => { c.rank = i + 1; c.is_best = i === 0; });
}

export function onComplete(done) {
  if (!done || done.training_id !== run.id) { loadCurrent(); return; }
  run.isTraining = false;
  run.stopping = false;
  const why = done.stopped ? "stopped" : (done.reason || "completed");
  toast(`Training ${done.stopped ? "stopped" : "finished"} at iteration ${done.final_iteration} (${why}).`, "ok");
  loadCurrent();
}

export function onError(failure) {
  if (failure?.training_id && run.id && failure.training_id !== run.id) return;
  const err = { message: failure?.error || "Training failed", suggestion: failure?.suggestion, code: "TRAINING_ERROR" };
  const title = `Training error${failure?.iteration ? ` at iteration ${failure.iteration}` : ""}`;
  $("#mon-error").replaceChildren(errorBox(err, title));
  toast(errorBox(err, title), "error");
  loadCurrent();
}

// --- actions --------------------------------------------------------------------------------------

async function stop() {
  const button = $("#mon-stop");
  await busy(button, "Stopping…", async () => {
    await api("/api/training/stop", { method: "POST" });
    run.stopping = true;
    toast("Stopping after the current step; a final checkpoint is written.");
  }, $("#mon-error"));
  renderHeader();
}

/** GET /api/checkpoints for the shown run. ``keepLive``: checkpoints that events announced while
 * the request was out stay in the table (re-ranked) rather than blink out until the next read. */
async function refreshCheckpoints({ keepLive = false } = {}) {
  if (!run.dir) return;
  const dir = run.dir;
  try {
    const data = await api("/api/checkpoints", { query: { training_dir: dir } });
    if (run.dir !== dir) return;
    const listed = data.checkpoints || [];
    const seen = new Set(listed.map((c) => c.iteration));
    const newer = keepLive ? run.checkpoints.filter((c) => !seen.has(c.iteration)) : [];
    run.checkpoints = [...listed, ...newer];
    if (newer.length) rank(run.checkpoints);
  } catch (err) {
    showError($("#mon-checkpoints"), err, "Could not list the checkpoints");
    return;
  }
  renderCheckpoints();
}

async function publish(checkpoint, button) {
  const out = $("#mon-publish");
  // The publisher's stages (fuse, save, dashboard, card) arrive as publish_progress events.
  const requestId = newRequestId();
  const stage = h("div", { class: "job", role: "status", "data-testid": "publish-stage" });
  out.replaceChildren(stage);
  const stopListening = onJobEvent(requestId, (kind, data) => {
    if (kind === "publish_progress") stage.textContent = `Publishing: ${data.stage} (${Math.round((data.fraction ?? 0) * 100)} %)`;
  });
  let result;
  try {
    result = await busy(button, "Publishing…", () => api("/api/training/publish_checkpoint", {
      method: "POST", requestId, body: { checkpoint_path: checkpoint.path, training_dir: run.dir },
    }), out);
  } finally {
    stopListening();
  }
  if (!result) return;
  toast(`Published ${result.model_name}`, "ok");
  out.replaceChildren(h("div", { class: "ok-box", role: "status", "data-testid": "published" },
    h("strong", {}, "Published "), h("code", {}, result.model_name),
    h("div", { class: "row-actions" },
      h("button", { type: "button", onclick: () => openPublished(result.dashboard_path, "Training dashboard") }, "Dashboard"),
      h("button", { type: "button", onclick: () => openPublished(result.readme_path, "Model card (README.md)") }, "Model card"),
      h("button", {
        type: "button", class: "primary",
        onclick: () => import("./chat.js").then((chat) => chat.chatWith(result.model_name)),
      }, "Chat with it"))));
}

// --- rendering ---------------------------------------------------------------------------------------

function renderEmpty() {
  run.dir = null; run.id = null; run.config = null; run.rows = new Map(); run.checkpoints = [];
  $("#mon-run").replaceChildren("No run yet — start one in ", h("a", { href: "#train" }, "Train"), ".");
  renderCharts();
  renderCheckpoints();
}

function applyStatus(status) {
  if (!status.output_dir || status.output_dir !== run.dir) return;
  run.isTraining = status.is_training;
  run.phase = status.phase || run.phase;
  if (status.current_iteration || status.is_training) {
    renderCards({
      iteration: status.current_iteration, training_loss: status.current_loss, validation_loss: status.validation_loss,
      learning_rate: status.learning_rate, tokens_per_second: status.tokens_per_second,
      memory_usage_gb: status.memory_usage_gb, progress_percentage: status.progress_percentage,
      eta_minutes: status.eta_minutes, world_size: status.world_size, hosts: status.hosts,
      host_memory_gb: status.host_memory_gb,
    });
  }
  renderHeader();
}

function renderHeader() {
  const phase = $("#mon-phase");
  phase.textContent = run.stopping && run.isTraining ? "stopping" : run.phase;
  phase.className = `badge ${run.isTraining ? "running" : /fail|error/.test(run.phase) ? "failed" : run.dir ? "done" : ""}`;
  $("#mon-stop").disabled = !run.isTraining || run.stopping;
  if (!run.dir) return;
  const c = run.config || {};
  $("#mon-run").replaceChildren(
    h("strong", {}, run.id || "run"), " · ", h("code", { class: "wrap-anywhere" }, run.dir),
    c.model_name ? ` · ${c.model_name} on ${c.dataset} (${String(c.training_type || "").toUpperCase()}, ` +
      `${c.fine_tune_type || ""}, ${fmtInt(c.max_iterations)} iterations)` : "");
}

function renderCards(u) {
  const max = run.config?.max_iterations;
  $("#st-iteration").textContent = u.iteration !== undefined ? `${fmtInt(u.iteration)}${max ? ` / ${fmtInt(max)}` : ""}` : "—";
  $("#st-eta").textContent = run.isTraining ? fmtEta(u.eta_minutes) : "—";
  $("#st-train").textContent = fmtNum(u.training_loss);
  $("#st-val").textContent = fmtNum(u.validation_loss ?? run.lastVal);
  $("#st-lr").textContent = fmtLr(u.learning_rate);
  $("#st-tps").textContent = u.tokens_per_second ? fmtTokens(u.tokens_per_second) : "—";
  $("#st-mem").textContent = fmtGb(u.memory_usage_gb) + (u.peak_memory_gb ? ` (peak ${fmtGb(u.peak_memory_gb)})` : "");
  renderRanks(u);
  const pct = u.progress_percentage ?? progressOf(u.iteration || 0);
  $("#mon-progress").value = pct;
  $("#mon-progress-text").textContent = `${pct.toFixed(1)} %`;
}

/** A distributed run: its world size and hosts, and the memory each host's ranks use (memory
 * above is the largest rank's). */
function renderRanks(u) {
  const world = u.world_size || run.config?.layout?.world_size || 1;
  const hosts = u.hosts?.length ? u.hosts : run.config?.layout?.hosts || [];
  $("#st-ranks").textContent = world > 1 ? `${fmtInt(world)} on ${hosts.join(", ")}` : "1";
  const perHost = Object.entries(u.host_memory_gb || {});
  $("#st-hostmem-box").hidden = !perHost.length;
  if (perHost.length) $("#st-hostmem").textContent = perHost.map(([host, gb]) => `${host} ${fmtGb(gb)}`).join(" · ");
}

function renderCharts() {
  const ckpt = new Map(run.checkpoints.map((c) => [c.iteration, c]));
  const xs = [...new Set([...run.rows.keys(), ...ckpt.keys()])].sort((a, b) => a - b);
  const col = (key) => xs.map((x) => run.rows.get(x)?.[key] ?? null);
  const val = xs.map((x) => run.rows.get(x)?.validation_loss ?? ckpt.get(x)?.validation_loss ?? null);
  charts.loss.setData([xs, col("training_loss"), val,
    xs.map((x) => (ckpt.has(x) ? ckpt.get(x).validation_loss : null)),
    xs.map((x) => (ckpt.get(x)?.is_best ? ckpt.get(x).validation_loss : null))]);
  const trainXs = xs.filter((x) => run.rows.get(x)?.training_loss !== undefined);
  const trainCol = (key) => trainXs.map((x) => run.rows.get(x)?.[key] ?? null);
  charts.lr.setData([trainXs, trainCol("learning_rate")]);
  charts.tps.setData([trainXs, trainCol("tokens_per_second")]);
  charts.mem.setData([trainXs, trainCol("memory_usage_gb")]);
}

function renderCheckpoints() {
  const wrap = $("#mon-checkpoints");
  if (!run.checkpoints.length) {
    wrap.replaceChildren(h("p", { class: "muted" }, run.dir ? "No checkpoints yet." : "No run."));
    return;
  }
  const rows = [...run.checkpoints].sort((a, b) => a.iteration - b.iteration).map((c) => h("tr", { class: c.is_best ? "best" : "", "data-iteration": c.iteration },
    h("td", { class: "num" }, fmtInt(c.iteration)),
    h("td", { class: "num" }, fmtNum(c.validation_loss)),
    h("td", { class: "num" }, c.rank ?? "—"),
    h("td", {}, c.is_best ? h("span", { class: "tag best" }, "best") : c.rank && c.rank <= 3 ? h("span", { class: "tag" }, "top 3") : ""),
    h("td", { class: "num" }, fmtMb(c.size_mb)),
    h("td", {}, h("button", {
      type: "button", class: "small", "data-iteration": c.iteration,
      "aria-label": `Publish checkpoint ${c.iteration}`, onclick: (e) => publish(c, e.currentTarget),
    }, "Publish"))));
  wrap.replaceChildren(h("table", { "data-testid": "checkpoints" },
    h("thead", {}, h("tr", {}, ["Iteration", "Val loss", "Rank", "", "Size", ""].map((t, i) =>
      h("th", { class: i === 0 || i === 1 || i === 2 || i === 4 ? "num" : "", scope: "col" }, t)))),
    h("tbody", {}, rows)));
}

