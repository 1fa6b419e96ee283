// The dataset page: task-level attribution (POST /api/attribute) over a built-in task or an
// uploaded JSONL file of prompt pairs; the metric, a layer x head heatmap of the first method's
// head scores, and a table of every component with one column per method.
//
// A built-in task's request lives in the URL (task, n, seed, method, component, ablation,
// ig_steps, logprob), so a link runs it again; an uploaded file cannot, so it is not kept.

import { $, colour, componentLink, el, fmt, getJson, postJson, showError, showModelInfo }
  from "/static/common.js";

const MAX_ROWS = 300; // rows shown in the table (the heatmap shows every head)

let model = null; // GET /api/model
let maxRecords = 512; // GET /api/tasks says
let upload = null; // { name, records, lines: the file line of each record }
let result = null; // the last response
let sort = { column: null, order: "desc" };

function checked(id) {
  return [...$(id).querySelectorAll("input:checked")].map((b) => b.value);
}

function source() {
  return document.querySelector('input[name="source"]:checked').value;
}

// ---- the uploaded file ----------------------------------------------------------------------

// One JSON object a line, blank lines skipped; the first bad line is an error naming it.
function parseJsonl(name, text) {
  const records = [];
  const lines = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    let record;
    try {
      record = JSON.parse(line);
    } catch (error) {
      throw new Error(`${name} line ${i + 1}: not JSON (${error.message})`);
    }
    if (record === null || typeof record !== "object" || Array.isArray(record)) {
      throw new Error(`${name} line ${i + 1}: expected a JSON object, one a line`);
    }
    records.push(record);
    lines.push(i + 1);
  });
  if (!records.length) throw new Error(`${name}: no records (one JSON object a line)`);
  if (records.length > maxRecords) {
    throw new Error(`${name}: ${records.length} records; the server takes at most ${maxRecords}`);
  }
  return { name, records, lines };
}

async function readFile() {
  upload = null;
  $("file-info").textContent = "";
  const file = $("file").files[0];
  if (!file) return;
  document.querySelector('input[name="source"][value="file"]').checked = true;
  try {
    upload = parseJsonl(file.name, await file.text());
    $("file-info").textContent = `${upload.records.length} records`;
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// The server numbers records from 1 ("dataset line 3") or, for a schema error, from 0
// ("dataset.2.prompt"); an uploaded file's reader wants its own line numbers.
function fileLines(message) {
  if (!upload) return message;
  const line = (i) => upload.lines[i] ?? `record ${i + 1}`;
  return message
    .replace(/dataset line (\d+)/g, (_, n) => `${upload.name} line ${line(Number(n) - 1)}`)
    .replace(/dataset\.(\d+)\./g, (_, i) => `${upload.name} line ${line(Number(i))}: `);
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
  if (source() === "file") {
    if (!upload) throw new Error("choose a JSONL file of prompt pairs (or a built-in task)");
    body.dataset = upload.records;
  } else {
    body.task = {
      name: $("task").value,
      n: Number.parseInt($("n").value, 10) || 16,
      seed: Number.parseInt($("seed").value, 10) || 0,
    };
  }
  return body;
}

function writeUrl(body) {
  if (!body.task) return;
  const q = new URLSearchParams({ task: body.task.name, n: body.task.n, seed: body.task.seed });
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
  $("task").value = q.get("task");
  for (const [key, id] of [["n", "n"], ["seed", "seed"], ["ig_steps", "ig-steps"]]) {
    if (q.has(key)) $(id).value = q.get(key);
  }
  for (const [key, id] of [["method", "methods"], ["component", "components"]]) {
    if (!q.has(key)) continue;
    for (const box of $(id).querySelectorAll("input")) box.checked = q.getAll(key).includes(box.value);
  }
  $("ablation").value = q.get("ablation") ?? "";
  $("logprob").checked = q.get("logprob") === "1";
  document.querySelector('input[name="source"][value="task"]').checked = true;
  return true;
}

// ---- running --------------------------------------------------------------------------------

let runId = 0;

async function run() {
  const id = ++runId;
  showError("");
  let body;
  try {
    body = request();
  } catch (error) {
    showError(error.message);
    return;
  }
  writeUrl(body);
  $("status").textContent = "computing…";
  $("run").disabled = true;
  try {
    const out = await postJson("/api/attribute", body);
    if (id !== runId) return;
    result = out;
    sort = { column: null, order: "desc" };
    render();
  } catch (error) {
    if (id !== runId) return;
    showError(body.dataset ? fileLines(error.message) : error.message);
  } finally {
    if (id === runId) {
      $("status").textContent = "";
      $("run").disabled = false;
    }
  }
}

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

async function start() {
  $("attribution-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("file").addEventListener("change", readFile);
  window.addEventListener("popstate", () => {
    if (readUrl()) run();
  });
  try {
    const [info, tasks] = await Promise.all([getJson("/api/model"), getJson("/api/tasks")]);
    model = info;
    showModelInfo(info);
    maxRecords = tasks.max_records;
    $("task").replaceChildren(...tasks.tasks.map((t) => el("option", { value: t }, t)));
    $("n").max = String(tasks.max_n);
  } catch (error) {
    showError(`cannot reach the tdb server: ${error.message}`);
    return;
  }
  if (readUrl()) await run();
}

start();
