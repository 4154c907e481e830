// Datasets: browse dataset/ folders and files with sizes and token estimates.

import { $, api, clearError, fmtInt, fmtMb, fmtTokens, go, h, showError } from "./api.js";
import { getModels, loadableGroups } from "./store.js";
import * as train from "./train.js";

let path = "dataset";
let info = new Map(); // "dataset/x" -> DatasetInfo
let method = "";

export async function init() {
  $("#ds-refresh").addEventListener("click", () => show());
  $("#ds-model").addEventListener("change", () => show());
  try {
    const groups = loadableGroups(await getModels());
    for (const g of groups) {
      $("#ds-model").append(h("optgroup", { label: g.group }, g.entries.map((e) => h("option", { value: e.value }, `${e.value}'s tokenizer`))));
    }
  } catch (err) {
    showError($("#ds-error"), err, "Could not list the models");
  }
}

export async function show() {
  const errorEl = $("#ds-error");
  clearError(errorEl);
  const model = $("#ds-model").value;
  try {
    const [listing, datasets] = await Promise.all([
      api("/api/filesystem/browse", { query: { path } }),
      api("/api/dataset/info", { query: { model } }),
    ]);
    info = new Map((datasets.datasets || []).map((d) => [d.path, d]));
    method = datasets.datasets?.[0]?.token_method || "";
    render(listing);
  } catch (err) {
    showError(errorEl, err, `Could not browse ${path}`);
  }
}

function open(next) {
  path = next;
  show();
}

function crumbs() {
  const parts = path.split("/").filter(Boolean);
  const nav = $("#ds-crumbs");
  nav.replaceChildren(...parts.flatMap((part, i) => {
    const target = parts.slice(0, i + 1).join("/");
    const last = i === parts.length - 1;
    return [i ? h("span", {}, "/") : null,
      h("button", { type: "button", class: "small", "aria-current": last ? "location" : null, disabled: last,
        onclick: () => open(target) }, part)].filter(Boolean);
  }));
}

function render(listing) {
  crumbs();
  const rows = [];
  if (path.includes("/")) {
    rows.push(h("tr", {}, h("td", { colspan: 6 }, h("button", { type: "button", class: "link",
      onclick: () => open(path.split("/").slice(0, -1).join("/")) }, "↑ up"))));
  }
  for (const d of listing.directories || []) {
    const full = `${path}/${d.name}`;
    const ds = info.get(full);
    rows.push(h("tr", {},
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => open(full) }, `${d.name}/`)),
      h("td", {}, ds ? h("span", { class: "tag" }, "dataset") : "folder"),
      h("td", { class: "num" }, d.file_count !== undefined ? fmtInt(d.file_count) : "—"),
      h("td", { class: "num" }, fmtMb(d.size_mb)),
      h("td", { class: "num" }, ds ? `${fmtTokens(ds.estimated_tokens)}` : `~${fmtTokens((d.size_mb * 1024 * 1024) / 4)}`),
      h("td", {}, ds ? h("button", { type: "button", class: "small", onclick: async () => {
        go("train");
        // The form may still be loading its schema: wait until the dataset picker exists.
        for (let i = 0; i < 50 && !$("#f-dataset option[value]"); i++) await new Promise((r) => setTimeout(r, 100));
        train.useDataset(ds.name);
      } }, "Train on it") : "")));
  }
  for (const f of listing.files || []) {
    rows.push(h("tr", {},
      h("td", { class: "wrap-anywhere" }, f.name),
      h("td", {}, f.name.split(".").pop()),
      h("td", { class: "num" }, "—"),
      h("td", { class: "num" }, fmtMb(f.size_mb)),
      h("td", { class: "num" }, `~${fmtTokens((f.size_mb * 1024 * 1024) / 4)}`),
      h("td", {})));
  }
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "Empty folder.")));
  $("#ds-table").replaceChildren(h("table", { "data-testid": "datasets" },
    h("caption", { class: "muted small-text" }, `Tokens: ${method || "estimate: UTF-8 bytes / 4"} (files: bytes / 4)`),
    h("thead", {}, h("tr", {}, ["Name", "Kind", "Files", "Size", "Tokens", ""].map((t, i) =>
      h("th", { scope: "col", class: i >= 2 && i <= 4 ? "num" : "" }, t)))),
    h("tbody", {}, rows)));
}
