// The tdb page: plain JavaScript, no build step, no network but this server.
//
// The whole investigation lives in the URL's query string (see readState / writeState), so a
// link reproduces it. Every change of state goes: state -> URL -> one POST /api/batch (node table,
// token views, and how target and distractor split into tokens) -> render. The table's order,
// filters and colours are computed here (table.js); choosing node types is answered from the
// server's results cache. Every active intervention is a chip that removes it, shown even when
// the request failed, so no state of the page is a dead end.

import { $, colour, el, fmt, getJson, postJson, showError, showModelInfo }
  from "/static/common.js";
import {
  DEFAULT_ORDER, DEFAULT_SORT, ORDERS, TYPE_NAMES, renderTable, tableMode, visibleRows,
} from "/static/table.js";

const NODE_TYPES = ["embedding", "attention_head", "mlp_neuron", "autoencoder_latent"];
const MLP_NODES = ["neurons", "latents", "both"];
const ATTN_NODES = ["heads", "latents", "both"];
const IOI = {
  prompt: "When Mary and John went to the store, John gave a drink to",
  target: " Mary",
  distractor: " John",
};
let maxK = 100; // the server's limit (GET /api/model's max_k), read at start

// ---- state <-> URL -------------------------------------------------------------------------

function emptyState() {
  return {
    prompt: "", target: "", distractor: "", logprob: false,
    second: "", second_target: "", second_distractor: "", k: 10,
    ablate: [], trace: "", downstream: "", view: [],
    types: [...NODE_TYPES], sort: "", order: DEFAULT_ORDER, mlp: "neurons", attn: "heads",
    // display only: the table's filters
    type: "", search: "", trivial: false, full: false,
  };
}

const TEXT_KEYS = ["prompt", "target", "distractor", "second", "second_target",
  "second_distractor", "trace", "downstream", "sort", "type", "search"];

function readState(search) {
  const q = new URLSearchParams(search);
  const state = emptyState();
  for (const key of TEXT_KEYS) state[key] = q.get(key) ?? state[key];
  const k = Number.parseInt(q.get("k") ?? "10", 10);
  state.k = Number.isFinite(k) ? k : 10;
  state.ablate = q.getAll("ablate");
  state.view = q.getAll("view");
  if (q.has("types")) state.types = q.get("types").split(",").filter((t) => NODE_TYPES.includes(t));
  if (ORDERS.includes(q.get("order"))) state.order = q.get("order");
  if (MLP_NODES.includes(q.get("mlp"))) state.mlp = q.get("mlp");
  if (ATTN_NODES.includes(q.get("attn"))) state.attn = q.get("attn");
  if (!NODE_TYPES.includes(state.type)) state.type = "";
  for (const key of ["logprob", "trivial", "full"]) state[key] = q.get(key) === "1";
  return state;
}

function writeState(state) {
  const q = new URLSearchParams();
  for (const key of ["prompt", "target", "distractor", "second", "second_target", "second_distractor"]) {
    if (state[key]) q.set(key, state[key]);
  }
  if (state.logprob) q.set("logprob", "1");
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
  } else if (state.order !== DEFAULT_ORDER) {
    q.set("order", state.order);
  }
  if (state.type) q.set("type", state.type);
  if (state.search) q.set("search", state.search);
  for (const key of ["trivial", "full"]) if (state[key]) q.set(key, "1");
  return "?" + q.toString();
}

let state = readState(window.location.search);
let lastTable = null; // the last node table response, for re-sorting without a request

function setState(changes, { fetchResults = true } = {}) {
  state = { ...state, ...changes };
  const url = writeState(state);
  if (url !== window.location.search) history.pushState(null, "", url);
  if (fetchResults) run();
  else if (lastTable) drawTable(lastTable);
}

window.addEventListener("popstate", () => {
  state = readState(window.location.search);
  clampK();
  fillForm();
  run();
});

// k within the server's range [1, max_k]: a URL asking for more gets the limit and a note.
function clampK() {
  const asked = state.k;
  state.k = Math.min(Math.max(1, asked), maxK);
  const note = $("k-note");
  note.hidden = asked === state.k;
  note.textContent = note.hidden ? "" : `k = ${asked} is outside this server's range 1–${maxK}: ` +
    `showing k = ${state.k}.`;
}

// ---- the form -------------------------------------------------------------------------------

function fillForm() {
  for (const [id, key] of [["prompt", "prompt"], ["target", "target"], ["distractor", "distractor"],
    ["second", "second"], ["second-target", "second_target"],
    ["second-distractor", "second_distractor"], ["search", "search"]]) {
    $(id).value = state[key];
  }
  $("logprob").checked = state.logprob;
  $("distractor").disabled = state.logprob;
  $("k").value = String(state.k);
  for (const box of $("node-types").querySelectorAll("input")) {
    box.checked = state.types.includes(box.value);
  }
  $("mlp-nodes").value = state.mlp;
  $("attn-nodes").value = state.attn;
  $("show-trivial").checked = state.trivial;
  $("full-columns").checked = state.full;
  renderLatentHint();
  renderSpaceWarnings();
}

function submitForm(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  const k = Number.parseInt($("k").value, 10);
  const changes = {
    prompt,
    second: $("second").value,
    second_target: $("second-target").value,
    second_distractor: $("second-distractor").value,
    target: $("target").value,
    distractor: $("distractor").value,
    logprob: $("logprob").checked,
    k: Number.isFinite(k) ? k : 10,
  };
  // Node ids name token positions of the first prompt: on another prompt they would point
  // elsewhere. A second prompt has the same positions, so it keeps them.
  if (prompt !== state.prompt) {
    Object.assign(changes, { ablate: [], trace: "", downstream: "", view: [] });
  }
  state = { ...state, ...changes };
  clampK();
  $("k").value = String(state.k);
  setState({});
}

// ---- requests -------------------------------------------------------------------------------

function requests() {
  const base = { prompt: state.prompt, ablate: state.ablate };
  if (state.target) base.target = state.target;
  if (state.logprob) base.logprob = true;
  else if (state.distractor) base.distractor = state.distractor;
  if (state.trace) base.trace = state.trace;
  if (state.downstream) base.downstream = state.downstream;
  if (state.mlp !== "neurons") base.mlp_nodes = state.mlp;
  if (state.attn !== "heads") base.attn_nodes = state.attn;
  const nodes = { ...base, k: state.k, node_types: state.types };
  if (state.second) {
    nodes.second_prompt = state.second;
    // Its own answers: a trace explains the same node on both prompts.
    if (!state.trace) {
      if (state.second_target) nodes.compare_target = state.second_target;
      if (state.second_distractor && !state.logprob) nodes.compare_distractor = state.second_distractor;
    }
  }
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

// Error texts are shared with the CLI and name its flags; the page names its own fields.
const FIELD_NAMES = [
  [/--second-prompt|--compare-prompt|--resample-prompt/g, "the Second prompt"],
  [/--compare-target/g, "the second prompt's target"],
  [/--compare-distractor/g, "the second prompt's distractor"],
  [/--vector FILE|--vector/g, "a residual-stream vector (not available on this page)"],
  [/--logprob/g, "“log p(target)”"],
  [/--target-id|--target/g, "Target"],
  [/--distractor-id|--distractor/g, "Distractor"],
  [/--ablate/g, "an ablation"],
  [/--downstream/g, "the trace's downstream node"],
  [/--trace/g, "the trace"],
  [/--view-node/g, "a token view"],
  [/--mlp-nodes/g, "“MLP as”"],
  [/--attn-nodes/g, "“attention as”"],
  [/--node-types/g, "Node types"],
  [/(^|[\s(])-k\b/g, "$1k"],
  // A schema error inside the batch: `requests.0.nodes.request.prompt: ...` -> `prompt: ...`
  [/requests\.\d+\.\w+\.request\./g, ""],
];

function pageMessage(message) {
  return FIELD_NAMES.reduce((text, [pattern, name]) => text.replace(pattern, name), message);
}

let runId = 0;

async function run() {
  renderInterventions();
  renderLatentHint();
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
    $("results").classList.remove("stale");
    lastTable = nodes.body;
    render(nodes.body, views.body, (untraced ?? views).body.logits);
    $("status").textContent = "";
  } catch (error) {
    if (id !== runId) return;
    // What is on screen answers an earlier request: greyed, not shown as current.
    $("results").classList.add("stale");
    showError(pageMessage(error.message) +
      (lastTable ? "\n(The greyed results below answer the previous request.)" : ""));
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

// Spaces: a GPT-2-style tokenizer puts a word's space at the start of the word's token, so a
// prompt ending in a space asks for an unusual next token, and " Mary" (with its space), not
// "Mary", is what follows a word.
function renderSpaceWarnings() {
  const box = $("space-warnings");
  box.replaceChildren();
  const warn = (testid, text) => box.append(el("p", { class: "warning", dataset: { testid } }, text));
  for (const [key, label] of [["prompt", "prompt"], ["second", "second prompt"]]) {
    const text = $(key).value;
    if (/\s$/.test(text)) {
      warn(`warning-${key}-space`, `The ${label} ends with a space: the next token usually carries ` +
        "its own leading space (\" Mary\"), so after a trailing space the model expects something " +
        "unusual. Remove the trailing space.");
    }
  }
  for (const [id, label, prompt] of [["target", "target", "prompt"],
    ["distractor", "distractor", "prompt"], ["second-target", "second prompt's target", "second"],
    ["second-distractor", "second prompt's distractor", "second"]]) {
    const text = $(id).value;
    const after = $(prompt).value;
    if (!text || $(id).disabled || /^\s/.test(text) || /\s$/.test(after)) continue;
    warn(`warning-${id}-space`, `The ${label} ${quoted(text)} has no leading space: after a word ` +
      `the next token is usually ${quoted(" " + text)}, with its space.`);
  }
}

// While typing: how target and distractor split, before anything is submitted.
let splitTimer = null;

function checkSplits() {
  renderSpaceWarnings();
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

function renderLatentHint() {
  const latents = state.mlp !== "neurons" || state.attn !== "heads";
  const hint = $("latent-hint");
  hint.hidden = !latents || state.types.includes("autoencoder_latent");
  hint.replaceChildren(...(hint.hidden ? [] : [
    "SAE latents are chosen (“MLP as” / “attention as”) but the node type “SAE latents” is " +
    "unticked, so the table cannot show them. ",
    el("button", { type: "button", onclick: () =>
      setState({ types: [...state.types, "autoencoder_latent"] }) }, "show SAE latents"),
  ]));
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
    const own = direction.right_target_texts
      ? ` with logit(${direction.right_target_texts.map(quoted).join(", ")}) − ` +
        `logit(${direction.right_distractor_texts.map(quoted).join(", ")})` : "";
    extra.push(`second prompt ${fmt(direction.right_value)}${own}, ` +
      `difference ${fmt(direction.right_value - direction.value)}`);
  }
  $("direction-extra").textContent = extra.length ? `(${extra.join("; ")})` : "";
  renderRightTokens(table.right_tokens);
  renderCandidates(candidates);
  renderHeatmap(views);
  renderViews(views.nodes);
  drawTable(table);
}

function renderRightTokens(tokens) {
  const box = $("right-tokens");
  box.hidden = !tokens;
  if (!tokens) return;
  box.replaceChildren(el("span", { class: "muted" }, "Second prompt's tokens: "),
    ...tokens.map((t, i) => el("span", { class: "token", title: `token ${i} (id ${t.id})` }, t.text)));
}

function chip(text, testid, onRemove) {
  return el("span", { class: "chip", dataset: { testid } }, text,
    el("button", { type: "button", title: "remove", "aria-label": `remove ${text}`, onclick: onRemove }, "×"));
}

function renderInterventions() {
  const none = () => [el("span", { class: "muted" }, "none")];
  const ablations = state.ablate.map((a) => chip(a, "ablation", () =>
    setState({ ablate: state.ablate.filter((x) => x !== a) })));
  $("ablations").replaceChildren(...(ablations.length ? ablations : none()));
  const trace = [];
  if (state.trace) {
    trace.push(chip(state.trace, "trace", () => setState({ trace: "", downstream: "" })));
  }
  if (state.downstream) {
    trace.push(el("span", { class: "muted" }, " downstream "),
      chip(state.downstream, "downstream", () => setState({ downstream: "" })));
  }
  $("trace").replaceChildren(...(trace.length ? trace : none()));
  const views = state.view.map((v) => chip(v, "view-chip", () =>
    setState({ view: state.view.filter((x) => x !== v) })));
  $("view-chips").replaceChildren(...(views.length ? views : none()));
  $("interventions").hidden = !state.prompt;
}

// TDB's candidates: logit, probability and logit relative to the target; target and distractor
// pinned at the top and labelled; ranks from 1.
function renderCandidates(logits) {
  const targetRow = logits.pinned.find((p) => p.role === "target") ?? logits.pinned[0];
  const relative = (value) => (targetRow ? fmt(value - targetRow.value) : "–");
  const pct = (p) => (p === null || p === undefined ? "–" : (100 * p).toFixed(2) + "%");
  const pinnedIds = new Set(logits.pinned.map((p) => p.id));
  const row = (cls, label, t, rank) => el("tr", { class: cls, dataset: { token: String(t.id) } },
    el("td", { class: "num rank" }, String(rank)),
    el("td", { class: "role" }, label),
    el("td", { class: "token" }, quoted(t.text)),
    el("td", { class: "num logit" }, fmt(t.value)),
    el("td", { class: "num prob" }, pct(t.prob)),
    el("td", { class: "num relative" }, relative(t.value)));
  const rows = logits.pinned.map((p) => row("pinned", p.role ?? "pinned", p, p.rank + 1));
  logits.top.slice(0, 10).forEach((t, i) =>
    rows.push(row(pinnedIds.has(t.id) ? "pinned-again" : "", "", t, i + 1)));
  $("candidates").replaceChildren(
    el("thead", {}, el("tr", {},
      el("th", { title: "1 = the highest logit" }, "rank"), el("th", {}, ""), el("th", {}, "token"),
      el("th", { title: "the next-token logit at the direction's position" }, "logit"),
      el("th", { title: "softmax of the logits" }, "p"),
      el("th", { title: "logit − the target's logit" }, "vs target"))),
    el("tbody", {}, ...rows));
  const loss = logits.loss;
  $("loss").textContent = loss === null || loss === undefined ? ""
    : `loss −log p(${quoted(targetRow.text)}) = ${fmt(loss)}`;
}

const HEATMAP_ROWS = {
  embedding: "embedding", mlp: "MLP neurons", attention_from: "attn (query)",
  attention_to: "attn (key)", latents_attn_out: "attn SAE latents",
  latents_mlp_post: "MLP-post SAE latents", latents_mlp_out: "MLP SAE latents",
};

function renderHeatmap(views) {
  // Node types the request left out read 0 everywhere: not shown.
  const absent = new Set();
  if (state.mlp === "latents") absent.add("mlp");
  if (state.attn === "latents") ["attention_from", "attention_to"].forEach((k) => absent.add(k));
  const effects = Object.entries(views.effect_by_token).filter(([key]) => !absent.has(key));
  let scale = 0;
  for (const [, values] of effects) {
    for (const v of values) scale = Math.max(scale, Math.abs(v ?? 0));
  }
  const head = el("tr", {}, el("th", {}, ""),
    ...views.tokens.map((t, i) => el("th", { title: `token ${i}` }, t.text)));
  const rows = effects.map(([key, values]) => el("tr", { dataset: { row: key } },
    el("th", {}, HEATMAP_ROWS[key] ?? key),
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

function nodeActions(node) {
  const button = (label, action, title, run) =>
    el("button", { type: "button", title, class: "action", dataset: { action }, onclick: run }, label);
  const actions = [];
  if (!state.ablate.includes(node.id)) {
    actions.push(button("ablate", "ablate", `zero-ablate ${node.id} and run again`,
      () => setState({ ablate: [...state.ablate, node.id] })));
  }
  // The trace ids come from the server (ids are printed by Python only): q, k, qk, v for a
  // head at a (query, key) pair, "pre" for a neuron or a latent.
  const traces = Object.entries(node.traces || {});
  if (traces.length > 1) actions.push(el("span", { class: "muted" }, "trace"));
  for (const [through, trace] of traces) {
    const pre = through === "pre";
    const title = pre ? `trace: explain the pre-activation of ${node.id}`
      : `trace: explain the attention logit of ${node.id} through ${through}` +
        (through === "v" ? " (its write through the value, on the downstream gradient)" : "");
    actions.push(button(pre ? "trace" : through, pre ? "trace" : `trace ${through}`, title, () => {
      // Through the value, the head's write is projected on the downstream gradient: that of
      // the node traced now, if any, else the direction of interest.
      const downstream = through === "v" && state.trace && !state.trace.endsWith(":v") ? state.trace : "";
      setState({ trace, downstream });
    }));
  }
  if (!state.view.includes(node.id)) {
    actions.push(button("views", "views", `tokens ${node.id} promotes and suppresses`,
      () => setState({ view: [...state.view, node.id] })));
  }
  return actions;
}

function drawTable(table) {
  const mode = tableMode(table);
  $("full-columns-box").hidden = mode === "plain";
  const sortBy = (column) => {
    const current = table.columns.includes(state.sort) ? state.sort : DEFAULT_SORT;
    const order = column !== current ? "abs"
      : ORDERS[(ORDERS.indexOf(state.order) + 1) % ORDERS.length];
    setState({ sort: column, order }, { fetchResults: false });
  };
  const counts = {};
  for (const node of table.nodes) counts[node.node_type] = (counts[node.node_type] ?? 0) + 1;
  $("type-filter").replaceChildren(el("option", { value: "" }, `all types (${table.nodes.length})`),
    ...NODE_TYPES.filter((t) => counts[t] || t === state.type).map((t) =>
      el("option", { value: t }, `${TYPE_NAMES[t]} (${counts[t] ?? 0})`)));
  $("type-filter").value = state.type;
  const { shown, hidden, total } = renderTable($("node-table"), table, state,
    { sort: sortBy, actions: nodeActions });
  $("trivial-count").textContent = state.trivial
    ? `(${visibleRows(table, { ...state, trivial: false }).hidden})` : `(${hidden} hidden)`;
  $("row-count").textContent = `(${shown} of ${total} rows, k = ${table.k})`;
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
  for (const id of ["target", "distractor", "prompt", "second", "second-target", "second-distractor"]) {
    $(id).addEventListener("input", checkSplits);
  }
  $("logprob").addEventListener("change", () => {
    $("distractor").disabled = $("logprob").checked;
    renderSpaceWarnings();
  });
  $("mlp-nodes").addEventListener("change", () => setState({ mlp: $("mlp-nodes").value }));
  $("attn-nodes").addEventListener("change", () => setState({ attn: $("attn-nodes").value }));
  $("node-types").addEventListener("change", (event) => {
    if (event.target.tagName === "SELECT") return; // "MLP as" / "attention as" have their own
    const types = [...$("node-types").querySelectorAll("input:checked")].map((b) => b.value);
    setState({ types });
  });
  const display = (changes) => setState(changes, { fetchResults: false });
  $("search").addEventListener("input", () => display({ search: $("search").value }));
  $("type-filter").addEventListener("change", () => display({ type: $("type-filter").value }));
  $("show-trivial").addEventListener("change", () => display({ trivial: $("show-trivial").checked }));
  $("full-columns").addEventListener("change", () => display({ full: $("full-columns").checked }));
  fillForm(); // at once: the form shows the URL's state while the model info loads
  try {
    const info = await getJson("/api/model");
    showModelInfo(info);
    maxK = info.max_k;
    $("k").max = String(maxK);
  } catch (error) {
    showError(`cannot reach the tdb server: ${error.message}`);
  }
  clampK();
  // The URL shows what is shown (k clamped); replaced, not pushed: it is the same view.
  if (state.prompt && writeState(state) !== window.location.search) {
    history.replaceState(null, "", writeState(state));
  }
  fillForm();
  await run();
}

start();
