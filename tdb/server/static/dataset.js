// The dataset page: task-level attribution (POST /api/attribute) over a built-in task or an
// uploaded JSONL file of prompt pairs; the metric, a layer x head heatmap of the first method's
// head scores, and a table of every component with one column per method.
//
// A built-in task's request lives in the URL (task, n, seed, method, component, ablation,
// ig_steps, logprob), so a link runs it again; an uploaded file cannot, so it is not kept.

import { $, colour, componentLink, el, fmt } from "/static/common.js";
import { pairs, pairsRunner, readPairs, startPairsPage, writePairs } from "/static/pairs.js";

const MAX_ROWS = 300; // rows shown in the table (the heatmap shows every head)

let model = null; // GET /api/model
let result = null; // the last response
let sort = { column: null, order: "desc" };

function checked(id) {
  return [...$(id).querySelectorAll("input:checked")].map((b) => b.value);
}

// ---- the request and the URL ----------------------------------------------------------------

function request() {
  const body = {
    methods: checked("methods"),
    components: checked("components"),
    ig_steps: Number.parseInt($("ig-steps").value, 10) || 10,
    logprob: $("logprob").checked,
  };
  if ($("ablation").value) body.ablation = $("ablation").value;
  return Object.assign(body, pairs());
}

function writeUrl(body) {
  if (!body.task) return;
  const q = new URLSearchParams();
  writePairs(q, body);
  for (const m of body.methods) q.append("method", m);
  for (const c of body.components) q.append("component", c);
  if (body.ablation) q.set("ablation", body.ablation);
  q.set("ig_steps", body.ig_steps);
  if (body.logprob) q.set("logprob", "1");
  const url = "?" + q.toString();
  if (url !== window.location.search) history.pushState(null, "", url);
}

function readUrl() {
  const q = new URLSearchParams(window.location.search);
  if (!q.has("task")) return false;
  readPairs(q);
  if (q.has("ig_steps")) $("ig-steps").value = q.get("ig_steps");
  for (const [key, id] of [["method", "methods"], ["component", "components"]]) {
    if (!q.has(key)) continue;
    for (const box of $(id).querySelectorAll("input")) box.checked = q.getAll(key).includes(box.value);
  }
  $("ablation").value = q.get("ablation") ?? "";
  $("logprob").checked = q.get("logprob") === "1";
  return true;
}

// ---- running --------------------------------------------------------------------------------

const run = pairsRunner({
  route: "/api/attribute",
  status: "computing…",
  request,
  writeUrl,
  show(out) {
    result = out;
    sort = { column: null, order: "desc" };
    render();
  },
});

// ---- rendering ------------------------------------------------------------------------------

function render() {
  $("results").hidden = false;
  const m = result.metric;
  const what = m.kind === "logprob" ? "log p(target)" : "logit(target) − logit(distractor)";
  $("metric").replaceChildren(
    `${what}, mean over ${result.n_prompts} prompts: clean `, el("strong", { id: "metric-clean" }, fmt(m.clean)),
    m.corrupted === null ? "" : "; corrupted ", m.corrupted === null ? "" : el("strong", { id: "metric-corrupted" }, fmt(m.corrupted)),
    el("span", { class: "muted" }, ` (ablation: ${result.ablation})`));
  renderHeatmap();
  renderScores();
}

// Layer x head: the first method's score of each head (summed over positions, by position).
function renderHeatmap() {
  const method = result.methods[0];
  const heads = result.components.filter((c) => c.node_type === "attention_head");
  $("heatmap-section").hidden = heads.length === 0;
  if (!heads.length) return;
  $("heatmap-method").textContent = method;
  const nLayer = model?.n_layer ?? Math.max(...heads.map((c) => c.layer)) + 1;
  const nHead = model?.n_head ?? Math.max(...heads.map((c) => c.index)) + 1;
  const grid = Array.from({ length: nLayer }, () => Array(nHead).fill(null));
  const links = Array.from({ length: nLayer }, () => Array(nHead).fill(null));
  for (const c of heads) {
    const score = c.scores[method];
    if (score === null || score === undefined) continue;
    grid[c.layer][c.index] = (grid[c.layer][c.index] ?? 0) + score;
    links[c.layer][c.index] = c.component;
  }
  const scale = Math.max(0, ...grid.flat().map((v) => Math.abs(v ?? 0)));
  const header = el("tr", {}, el("th", {}, "layer \\ head"),
    ...Array.from({ length: nHead }, (_, h) => el("th", {}, String(h))));
  const rows = grid.map((values, layer) => el("tr", {}, el("th", {}, String(layer)),
    ...values.map((v, h) => {
      const id = `h${layer}.${h}`;
      const cell = el("td", { class: "num cell", title: `${id}: ${fmt(v)}`, dataset: { head: id } },
        links[layer][h] ? el("a", { href: links[layer][h] }, fmt(v)) : fmt(v));
      cell.style.background = colour(v, scale);
      return cell;
    })));
  $("head-heatmap").replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
}

function sortedRows() {
  const rows = [...result.components];
  if (!sort.column) return rows; // the server's order: the first method's |score|
  const sign = sort.order === "asc" ? 1 : -1;
  return rows.sort((a, b) => {
    const x = a.scores[sort.column], y = b.scores[sort.column];
    if (x === null || x === undefined) return y === null || y === undefined ? 0 : 1;
    if (y === null || y === undefined) return -1;
    return sign * (x - y);
  });
}

function renderScores() {
  const byPosition = result.by === "position";
  const scales = Object.fromEntries(result.methods.map((m) =>
    [m, Math.max(0, ...result.components.map((c) => Math.abs(c.scores[m] ?? 0)))]));
  const header = el("tr", {}, el("th", {}, "component"), el("th", {}, "type"),
    byPosition ? el("th", {}, "position") : null,
    ...result.methods.map((m) => {
      const arrow = sort.column === m ? (sort.order === "asc" ? " ▲" : " ▼") : "";
      return el("th", {
        class: "sortable", title: `sort by ${m}`, dataset: { column: m },
        onclick: () => {
          sort = { column: m, order: sort.column === m && sort.order === "desc" ? "asc" : "desc" };
          renderScores();
        },
      }, m + arrow);
    }));
  const shown = sortedRows().slice(0, MAX_ROWS);
  const rows = shown.map((c) => el("tr", { dataset: { component: c.id } },
    el("td", { class: "id" }, componentLink(c.id, c.component)),
    el("td", {}, c.node_type),
    byPosition ? el("td", { class: "num" }, String(c.position)) : null,
    ...result.methods.map((m) => {
      const cell = el("td", { class: "num", dataset: { column: m } }, fmt(c.scores[m]));
      cell.style.background = colour(c.scores[m], scales[m]);
      return cell;
    })));
  $("scores").replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
  const total = result.components.length;
  $("score-count").textContent = total > shown.length
    ? `(the top ${shown.length} of ${total} rows)` : `(${total} rows)`;
}

// ---- start ----------------------------------------------------------------------------------

startPairsPage({
  form: "attribution-form",
  run,
  readUrl,
  onModel(info) {
    model = info;
  },
});
