// The tdb page: plain JavaScript, no build step, no network but this server.
//
// The whole investigation lives in the URL's query string (see readState / writeState), so a
// link reproduces it. Every change of state goes: state -> URL -> one POST /api/batch (node table,
// token views, and how target and distractor split into tokens) -> render. Sorting and colours
// are computed here; choosing node types is answered from the server's results cache.

import { $, colour, componentLink, el, fmt, getJson, postJson, showError, showModelInfo }
  from "/static/common.js";

const NODE_TYPES = ["embedding", "attention_head", "mlp_neuron", "autoencoder_latent"];
const MLP_NODES = ["neurons", "latents", "both"];
const ATTN_NODES = ["heads", "latents", "both"];
const IOI = {
  prompt: "When Mary and John went to the store, John gave a drink to",
  target: " Mary",
  distractor: " John",
};

// ---- state <-> URL -------------------------------------------------------------------------

function emptyState() {
  return {
    prompt: "", target: "", distractor: "", second: "", k: 10,
    ablate: [], trace: "", downstream: "", view: [],
    types: [...NODE_TYPES], sort: "", order: "desc", mlp: "neurons", attn: "heads",
  };
}

function readState(search) {
  const q = new URLSearchParams(search);
  const state = emptyState();
  for (const key of ["prompt", "target", "distractor", "second", "trace", "downstream", "sort"]) {
    state[key] = q.get(key) ?? state[key];
  }
  state.k = Number.parseInt(q.get("k") ?? "10", 10) || 10;
  state.ablate = q.getAll("ablate");
  state.view = q.getAll("view");
  if (q.has("types")) state.types = q.get("types").split(",").filter((t) => NODE_TYPES.includes(t));
  state.order = q.get("order") === "asc" ? "asc" : "desc";
  if (MLP_NODES.includes(q.get("mlp"))) state.mlp = q.get("mlp");
  if (ATTN_NODES.includes(q.get("attn"))) state.attn = q.get("attn");
  return state;
}

function writeState(state) {
  const q = new URLSearchParams();
  for (const key of ["prompt", "target", "distractor", "second"]) {
    if (state[key]) q.set(key, state[key]);
  }
  q.set("k", String(state.k));
  for (const a of state.ablate) q.append("ablate", a);
  if (state.trace) q.set("trace", state.trace);
  if (state.downstream) q.set("downstream", state.downstream);
  for (const v of state.view) q.append("view", v);
  if (state.types.length !== NODE_TYPES.length) q.set("types", state.types.join(","));
  if (state.mlp !== "neurons") q.set("mlp", state.mlp);
  if (state.attn !== "heads") q.set("attn", state.attn);
  if (state.sort) {
    q.set("sort", state.sort);
    q.set("order", state.order);
  }
  return "?" + q.toString();
}

let state = readState(window.location.search);
let lastTable = null; // the last node table response, for re-sorting without a request

function setState(changes, { fetchResults = true } = {}) {
  state = { ...state, ...changes };
  const url = writeState(state);
  if (url !== window.location.search) history.pushState(null, "", url);
  if (fetchResults) run();
  else if (lastTable) renderTable(lastTable);
}

window.addEventListener("popstate", () => {
  state = readState(window.location.search);
  fillForm();
  run();
});

// ---- the form -------------------------------------------------------------------------------

function fillForm() {
  $("prompt").value = state.prompt;
  $("target").value = state.target;
  $("distractor").value = state.distractor;
  $("second").value = state.second;
  $("k").value = String(state.k);
  for (const box of $("node-types").querySelectorAll("input")) {
    box.checked = state.types.includes(box.value);
  }
  $("mlp-nodes").value = state.mlp;
  $("attn-nodes").value = state.attn;
}

function submitForm(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  const second = $("second").value;
  const changes = {
    prompt, second,
    target: $("target").value,
    distractor: $("distractor").value,
    k: Number.parseInt($("k").value, 10) || 10,
  };
  // Node ids name token positions: interventions on another prompt would point elsewhere.
  if (prompt !== state.prompt || second !== state.second) {
    Object.assign(changes, { ablate: [], trace: "", downstream: "", view: [] });
  }
  setState(changes);
}

// ---- requests -------------------------------------------------------------------------------

function requests() {
  const base = { prompt: state.prompt, ablate: state.ablate };
  if (state.target) base.target = state.target;
  if (state.distractor) base.distractor = state.distractor;
  if (state.trace) base.trace = state.trace;
  if (state.downstream) base.downstream = state.downstream;
  if (state.mlp !== "neurons") base.mlp_nodes = state.mlp;
  if (state.attn !== "heads") base.attn_nodes = state.attn;
  const nodes = { ...base, k: state.k, node_types: state.types };
  if (state.second) nodes.second_prompt = state.second;
  const items = [
    { route: "nodes", request: nodes },
    { route: "views", request: { ...base, view_nodes: state.view } },
    { route: "tokenize", request: { text: state.target } },
    { route: "tokenize", request: { text: state.distractor } },
  ];
  // A traced direction has no target or distractor to pin: the candidates then come from the
  // untraced direction (usually a cache hit: it was shown before the trace).
  if (state.trace) {
    const untraced = { ...base, view_nodes: [] };
    delete untraced.trace;
    delete untraced.downstream;
    items.push({ route: "views", request: untraced });
  }
  return items;
}

let runId = 0;

async function run() {
  if (!state.prompt) return;
  const id = ++runId;
  $("status").textContent = "computing…";
  $("submit").disabled = true;
  try {
    const { responses } = await postJson("/api/batch", { requests: requests() });
    if (id !== runId) return; // a newer request is on its way
    const [nodes, views, target, distractor, untraced] = responses;
    renderWarnings([["target", state.target, target], ["distractor", state.distractor, distractor]]);
    const failed = [nodes, views, untraced ?? views].find((r) => r.status !== 200);
    if (failed) throw new Error(failed.error.error);
    showError("");
    lastTable = nodes.body;
    render(nodes.body, views.body, (untraced ?? views).body.logits);
    $("status").textContent = "";
  } catch (error) {
    if (id !== runId) return;
    showError(error.message);
    $("status").textContent = "";
  } finally {
    if (id === runId) $("submit").disabled = false;
  }
}

function quoted(text) {
  return JSON.stringify(text);
}

function renderWarnings(items) {
  const box = $("token-warnings");
  box.replaceChildren();
  for (const [name, text, result] of items) {
    if (!text || result.status !== 200 || result.body.single_token) continue;
    const pieces = result.body.tokens.map((t) => quoted(t.text)).join(" | ") || "nothing";
    box.append(el("p", { class: "warning", dataset: { testid: `warning-${name}` } },
      `The ${name} ${quoted(text)} is not a single token: it splits into ${pieces}.`));
  }
}

// While typing: how target and distractor split, before anything is submitted.
let splitTimer = null;

function checkSplits() {
  clearTimeout(splitTimer);
  splitTimer = setTimeout(async () => {
    const items = [["target", $("target").value], ["distractor", $("distractor").value]];
    try {
      const { responses } = await postJson("/api/batch", {
        requests: items.map(([, text]) => ({ route: "tokenize", request: { text } })),
      });
      renderWarnings(items.map(([name, text], i) => [name, text, responses[i]]));
    } catch {
      // The submitted request will report what is wrong.
    }
  }, 300);
}

// ---- rendering ------------------------------------------------------------------------------

function directionLabel(direction) {
  const names = (texts) => texts.map(quoted).join(", ");
  switch (direction.kind) {
    case "logit_diff":
      return `logit(${names(direction.target_texts)}) − logit(${names(direction.distractor_texts)})` +
        ` at token ${direction.position}`;
    case "logprob":
      return `log p(${names(direction.target_texts)}) at token ${direction.position}`;
    case "mlp_pre_activation":
      return `pre-activation of ${direction.node}`;
    case "attention_logit":
      return `attention_logit of ${direction.node} through ${direction.through}`;
    case "attention_value_write":
      return `attention_value_write of ${direction.node} (its write through v, on the gradient ` +
        `of ${direction.downstream})`;
    default:
      return `${direction.kind} of ${direction.node ?? "the residual stream"}`;
  }
}

function render(table, views, candidates) {
  $("results").hidden = false;
  const direction = table.direction;
  $("direction-label").textContent = directionLabel(direction);
  $("direction-value").textContent = fmt(direction.value);
  const extra = [];
  if (direction.baseline_value !== undefined) {
    extra.push(`before ablation ${fmt(direction.baseline_value)}, ` +
      `change ${fmt(direction.value - direction.baseline_value)}`);
  }
  if (direction.right_value !== undefined) {
    extra.push(`right prompt ${fmt(direction.right_value)}, ` +
      `difference ${fmt(direction.right_value - direction.value)}`);
  }
  $("direction-extra").textContent = extra.length ? `(${extra.join("; ")})` : "";
  renderInterventions();
  renderCandidates(candidates);
  renderHeatmap(views);
  renderViews(views.nodes);
  renderTable(table);
}

function chip(text, testid, onRemove) {
  return el("span", { class: "chip", dataset: { testid } }, text,
    el("button", { type: "button", title: "remove", "aria-label": `remove ${text}`, onclick: onRemove }, "×"));
}

function renderInterventions() {
  const ablations = state.ablate.map((a) => chip(a, "ablation", () =>
    setState({ ablate: state.ablate.filter((x) => x !== a) })));
  $("ablations").replaceChildren(...(ablations.length ? ablations : [el("span", { class: "muted" }, "none")]));
  const trace = [];
  if (state.trace) {
    trace.push(chip(state.trace, "trace", () => setState({ trace: "", downstream: "" })));
  }
  if (state.downstream) {
    trace.push(el("span", { class: "muted" }, " downstream "),
      chip(state.downstream, "downstream", () => setState({ downstream: "" })));
  }
  $("trace").replaceChildren(...(trace.length ? trace : [el("span", { class: "muted" }, "none")]));
}

function renderCandidates(logits) {
  const pinned = new Map(logits.pinned.map((p, i) => [p.id, i < 1 ? "target" : "pinned"]));
  const rows = logits.pinned.map((p) => el("tr", { class: "pinned" },
    el("td", {}, quoted(p.text)), el("td", { class: "num" }, fmt(p.value)),
    el("td", { class: "muted" }, `rank ${p.rank}`)));
  for (const t of logits.top.slice(0, 10)) {
    rows.push(el("tr", { class: pinned.has(t.id) ? "pinned-again" : "" },
      el("td", {}, quoted(t.text)), el("td", { class: "num" }, fmt(t.value)), el("td", {}, "")));
  }
  $("candidates").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "token"), el("th", {}, "logit"), el("th", {}, ""))),
    el("tbody", {}, ...rows));
}

function renderHeatmap(views) {
  const effects = views.effect_by_token;
  const names = { embedding: "embedding", mlp: "MLP", attention_from: "attn (query)", attention_to: "attn (key)" };
  let scale = 0;
  for (const values of Object.values(effects)) {
    for (const v of values) scale = Math.max(scale, Math.abs(v ?? 0));
  }
  const head = el("tr", {}, el("th", {}, ""),
    ...views.tokens.map((t, i) => el("th", { title: `token ${i}` }, t.text)));
  const rows = Object.entries(effects).map(([key, values]) => el("tr", {},
    el("th", {}, names[key] ?? key),
    ...values.map((v, i) => {
      const cell = el("td", { title: `${views.tokens[i].text}@${i}: ${fmt(v)}`, class: "num" }, fmt(v));
      cell.style.background = colour(v, scale);
      return cell;
    })));
  $("heatmap").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

function renderViews(nodes) {
  $("views-section").hidden = nodes.length === 0;
  const list = (title, tokens) => el("div", {}, el("h4", {}, title),
    el("ol", {}, ...tokens.map((t) => el("li", {}, `${quoted(t.text)} ${fmt(t.value)}`))));
  $("views").replaceChildren(...nodes.map((view) => el("div", { class: "view", dataset: { testid: "view" } },
    el("h3", {}, view.id, " ",
      el("button", { type: "button", title: "close", onclick: () =>
        setState({ view: state.view.filter((v) => v !== view.id) }) }, "×")),
    el("div", { class: "view-lists" },
      list("promotes", view.promotes),
      list("suppresses", view.suppresses),
      view.exciting_tokens ? el("div", {}, el("h4", {}, "most active at"),
        el("ol", {}, ...view.exciting_tokens.map((t) =>
          el("li", {}, `${quoted(t.text)}@${t.token} ${fmt(t.value)}`)))) : null))));
}

function columnLabel(column, compare) {
  if (compare && !column.endsWith("_right") && !column.endsWith("_diff")) return `${column} (left)`;
  return column.replace(/_(right|diff|baseline)$/, " ($1)");
}

function sortedNodes(table) {
  const nodes = [...table.nodes];
  if (!state.sort || !table.columns.includes(state.sort)) return nodes;
  const sign = state.order === "asc" ? 1 : -1;
  const key = (n) => n.values[state.sort];
  return nodes.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null) return y === null ? 0 : 1;
    if (y === null) return -1;
    return sign * (x - y);
  });
}

function nodeActions(node) {
  const button = (label, title, action) =>
    el("button", { type: "button", title, class: "action", dataset: { action: label }, onclick: action }, label);
  const actions = [];
  if (!state.ablate.includes(node.id)) {
    actions.push(button("ablate", `zero-ablate ${node.id} and run again`,
      () => setState({ ablate: [...state.ablate, node.id] })));
  }
  // The trace ids come from the server (ids are printed by Python only): q, k, qk, v for a
  // head at a (query, key) pair, "pre" for a neuron or a latent.
  for (const [through, trace] of Object.entries(node.traces || {})) {
    const label = through === "pre" ? "trace" : `trace ${through}`;
    const title = through === "pre" ? `explain the pre-activation of ${node.id}`
      : `explain the attention logit of ${node.id} through ${through}`;
    actions.push(button(label, title, () => {
      // Through the value, the head's write is projected on the downstream gradient: that of
      // the node traced now, if any, else the direction of interest.
      const downstream = through === "v" && state.trace && !state.trace.endsWith(":v") ? state.trace : "";
      setState({ trace, downstream });
    }));
  }
  if (!state.view.includes(node.id)) {
    actions.push(button("views", `tokens ${node.id} promotes and suppresses`,
      () => setState({ view: [...state.view, node.id] })));
  }
  return actions;
}

// Each metric next to its baseline / right-prompt value and difference.
function columnOrder(table) {
  const order = [];
  for (const group of table.groups) {
    for (const suffix of ["", "_baseline", "_right", "_diff"]) {
      if (table.columns.includes(group + suffix)) order.push(group + suffix);
    }
  }
  return [...order, ...table.columns.filter((c) => !order.includes(c))];
}

function renderTable(table) {
  const columns = columnOrder(table);
  const compare = columns.some((c) => c.endsWith("_right"));
  const scales = Object.fromEntries(columns.map((c) =>
    [c, Math.max(0, ...table.nodes.map((n) => Math.abs(n.values[c] ?? 0)))]));
  const header = el("tr", {}, el("th", {}, "node"), el("th", {}, "name"),
    ...columns.map((c) => {
      const arrow = state.sort === c ? (state.order === "asc" ? " ▲" : " ▼") : "";
      return el("th", {
        class: "sortable", title: `sort by ${c}`, dataset: { column: c },
        onclick: () => setState({
          sort: c, order: state.sort === c && state.order === "desc" ? "asc" : "desc",
        }, { fetchResults: false }),
      }, columnLabel(c, compare) + arrow);
    }),
    el("th", {}, "actions"));
  const rows = sortedNodes(table).map((node) => el("tr", { dataset: { node: node.id } },
    el("td", { class: "id" }, componentLink(node.id, node.component)),
    el("td", { class: "name" }, node.name),
    ...columns.map((c) => {
      const cell = el("td", { class: "num", dataset: { column: c } }, fmt(node.values[c]));
      cell.style.background = colour(node.values[c], scales[c]);
      return cell;
    }),
    el("td", { class: "actions" }, ...nodeActions(node))));
  $("node-table").replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
  $("row-count").textContent = `(${table.nodes.length} rows, k = ${table.k})`;
}

// ---- start ----------------------------------------------------------------------------------

async function start() {
  $("request-form").addEventListener("submit", submitForm);
  $("example").addEventListener("click", () => {
    $("prompt").value = IOI.prompt;
    $("target").value = IOI.target;
    $("distractor").value = IOI.distractor;
    checkSplits();
  });
  $("target").addEventListener("input", checkSplits);
  $("distractor").addEventListener("input", checkSplits);
  $("mlp-nodes").addEventListener("change", () => setState({ mlp: $("mlp-nodes").value }));
  $("attn-nodes").addEventListener("change", () => setState({ attn: $("attn-nodes").value }));
  $("node-types").addEventListener("change", () => {
    const types = [...$("node-types").querySelectorAll("input:checked")].map((b) => b.value);
    setState({ types });
  });
  fillForm();
  try {
    showModelInfo(await getJson("/api/model"));
  } catch (error) {
    showError(`cannot reach the tdb server: ${error.message}`);
  }
  await run();
}

start();
