// The circuit page: a circuit over a built-in task or an uploaded JSONL file of prompt pairs
// (POST /api/circuit): the measured faithfulness, the graph and the faithfulness curve (SVG
// drawn by the server, tdb.circuit.graph, inlined so its links and tooltips work), and the
// components and edges as tables.
//
// A built-in task's request lives in the URL (task, n, seed, method, component, ablation,
// target, max_components, max_edges, verify, ig_steps, logprob), so a link runs it again.

import { $, componentLink, el, fmt } from "/static/common.js";
import { pairs, pairsRunner, readPairs, startPairsPage, writePairs } from "/static/pairs.js";

// The URL's names of the number inputs, and their ids.
const NUMBERS = [
  ["target", "target", "target_faithfulness"],
  ["max_components", "max-components", "max_components"],
  ["max_edges", "max-edges", "max_edges"],
  ["verify", "verify", "verify"],
  ["ig_steps", "ig-steps", "ig_steps"],
];

let result = null; // the last response

// The graph's colours, as the node table's: red carries the behaviour, blue opposes it
// (tdb.circuit.graph).
function edgeColour(value, scale) {
  if (value === null || value === undefined || !scale) return "";
  const alpha = Math.min(1, Math.abs(value) / scale) * 0.55;
  return value >= 0 ? `rgba(198, 40, 40, ${alpha})` : `rgba(31, 95, 191, ${alpha})`;
}

// ---- the request and the URL ----------------------------------------------------------------

function request() {
  const body = {
    method: $("method").value,
    components: [...$("components").querySelectorAll("input:checked")].map((b) => b.value),
    logprob: $("logprob").checked,
  };
  for (const [, id, field] of NUMBERS) {
    const value = Number($(id).value);
    if ($(id).value === "" || !Number.isFinite(value)) throw new Error(`${field}: give a number`);
    body[field] = field === "target_faithfulness" ? value : Math.trunc(value);
  }
  if ($("ablation").value) body.ablation = $("ablation").value;
  return Object.assign(body, pairs());
}

function writeUrl(body) {
  if (!body.task) return;
  const q = new URLSearchParams();
  writePairs(q, body);
  q.set("method", body.method);
  for (const c of body.components) q.append("component", c);
  if (body.ablation) q.set("ablation", body.ablation);
  for (const [key, , field] of NUMBERS) q.set(key, body[field]);
  if (body.logprob) q.set("logprob", "1");
  const url = "?" + q.toString();
  if (url !== window.location.search) history.pushState(null, "", url);
}

function readUrl() {
  const q = new URLSearchParams(window.location.search);
  if (!q.has("task")) return false;
  readPairs(q);
  if (q.has("method")) $("method").value = q.get("method");
  if (q.has("component")) {
    for (const box of $("components").querySelectorAll("input")) {
      box.checked = q.getAll("component").includes(box.value);
    }
  }
  $("ablation").value = q.get("ablation") ?? "";
  for (const [key, id] of NUMBERS) if (q.has(key)) $(id).value = q.get(key);
  $("logprob").checked = q.get("logprob") === "1";
  return true;
}

// ---- running --------------------------------------------------------------------------------

const run = pairsRunner({
  route: "/api/circuit",
  status: "searching for the circuit… (each step measures a patched forward pass)",
  request,
  writeUrl,
  show(out) {
    result = out;
    render();
  },
  onError() {
    $("results").hidden = true;
  },
});

// ---- rendering ------------------------------------------------------------------------------

function render() {
  $("results").hidden = false;
  const m = result.metric;
  const what = m.kind === "logprob" ? "log p(target)" : "logit(target) − logit(distractor)";
  const reached = result.faithfulness !== null && result.faithfulness >= result.target_faithfulness;
  $("summary").replaceChildren(
    `${result.components.length} components (ordered by ${result.method}; ablation: ${result.ablation}): `,
    "measured faithfulness ", el("strong", { id: "faithfulness" }, fmt(result.faithfulness)),
    ` (target ${fmt(result.target_faithfulness)}${reached ? ", reached" : ", not reached"}). `,
    el("br"),
    el("span", { class: "muted" },
      `${what}, mean over ${result.n_prompts} prompts: full model ${fmt(result.m_full)}, ` +
      `circuit ${fmt(result.m_circuit)}, empty circuit ${fmt(result.m_empty)}` +
      (m.corrupted === null ? "" : `; corrupted prompts ${fmt(m.corrupted)}`)));
  // The server's SVG (its text escaped there): inline, so its <a> and <title> work.
  $("graph").innerHTML = result.svg;
  $("curve").innerHTML = result.curve_svg;
  renderComponents();
  renderEdges();
}

function renderComponents() {
  const sums = (ids, key) => Object.fromEntries(ids.map((c) =>
    [c, result.edges.filter((e) => e[key] === c).reduce((s, e) => s + (e.score ?? 0), 0)]));
  const into = sums(result.components, "to");
  const out = sums(result.components, "from");
  const header = el("tr", {}, el("th", {}, "#"), el("th", {}, "component"),
    el("th", {}, "edges in (score sum)"), el("th", {}, "edges out (score sum)"));
  const rows = result.components.map((c, i) => el("tr", { dataset: { component: c } },
    el("td", { class: "num" }, String(i + 1)),
    el("td", { class: "id" }, componentLink(c, result.links[c])),
    el("td", { class: "num" }, fmt(into[c])),
    el("td", { class: "num" }, fmt(out[c]))));
  $("components-table").replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
  $("component-count").textContent = `(${result.components.length}, by decreasing ${result.method} score)`;
}

function renderEdges() {
  const scale = Math.max(0, ...result.edges.map((e) => Math.abs(e.score ?? 0)));
  const header = el("tr", {}, ...["from", "to", "input", "score", "exact"].map((h) => el("th", {}, h)));
  const end = (id) => (result.links[id] ? componentLink(id, result.links[id]) : id);
  const rows = result.edges.map((e) => el("tr", {},
    el("td", { class: "id" }, end(e.from)), el("td", { class: "id" }, end(e.to)),
    el("td", {}, e.input),
    ...[e.score, e.exact].map((v) => {
      const cell = el("td", { class: "num" }, fmt(v));
      cell.style.background = edgeColour(v, scale);
      return cell;
    })));
  $("edges-table").replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
  $("edge-count").textContent = `(${result.edges.length}; red: positive score, blue: negative)`;
}

// ---- start ----------------------------------------------------------------------------------

startPairsPage({ form: "circuit-form", run, readUrl });
