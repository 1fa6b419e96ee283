// The node table of the main page: which rows show (type, id search, trivial rows), in which
// order (direct effect by magnitude unless the URL says otherwise), which columns (a compact
// value-and-change pair per metric when there is an ablation or a second prompt), and colours
// scaled per node type. Pure functions of the server's table and the page's view state, except
// `renderTable`, which draws them.

import { colour, componentLink, el, fmt } from "/static/common.js";

export const DEFAULT_SORT = "direct_effect";
export const DEFAULT_ORDER = "abs";
export const ORDERS = ["abs", "desc", "asc"];

// What each metric means (docs/node-table.md, DESIGN.md): shown as the header's tooltip.
export const METRICS = {
  activation: {
    label: "activation",
    help: "Activation: an MLP neuron's post-activation, an attention head's probability " +
      "p(query → key), an SAE latent's value z; 1 for a token embedding.",
  },
  write_norm: {
    label: "write magnitude",
    help: "Write magnitude: the norm of the vector the node writes into the residual stream " +
      "(|a|·‖W_out[n]‖, p·‖v·W_O‖, |z|·‖decoder‖, ‖embedding‖). Independent of the direction.",
  },
  direct_effect: {
    label: "direct effect",
    help: "Direct effect: the node's write vector · the gradient of the direction of interest at " +
      "its position — its effect through the residual stream alone, not through later layers. " +
      "0 for nodes after the direction's token or layer.",
  },
  act_times_grad: {
    label: "est. total effect",
    help: "Estimated total effect: activation × ∂direction/∂activation — a first-order estimate " +
      "that includes indirect paths through later layers.",
  },
};

export const TYPE_NAMES = {
  embedding: "embeddings",
  attention_head: "attention heads",
  mlp_neuron: "MLP neurons",
  autoencoder_latent: "SAE latents",
};

const EFFECTS = ["direct_effect", "act_times_grad"];
const COLUMN_ORDER = [...EFFECTS, "activation", "write_norm"];
const TINY = 1e-6;

// The kind of table: plain, ablation (before / after / change) or comparison (left / right).
export function tableMode(table) {
  if (table.columns.some((c) => c.endsWith("_right"))) return "compare";
  if (table.columns.some((c) => c.endsWith("_baseline"))) return "ablation";
  return "plain";
}

const SUFFIX_NAMES = {
  ablation: { "": "after", _baseline: "before", _diff: "change" },
  compare: { "": "left", _right: "right", _diff: "diff" },
  plain: { "": "" },
};

// The columns shown: every metric; with an ablation or a comparison, its value and its change
// (compact), or all three (full).
export function shownColumns(table, full) {
  const mode = tableMode(table);
  const suffixes = mode === "plain" ? [""]
    : full ? ["", mode === "ablation" ? "_baseline" : "_right", "_diff"] : ["", "_diff"];
  // The effects first: they answer the question; activation and write magnitude explain them.
  const rank = (g) => (COLUMN_ORDER.includes(g) ? COLUMN_ORDER.indexOf(g) : COLUMN_ORDER.length);
  const groups = [...table.groups].sort((a, b) => rank(a) - rank(b));
  const out = [];
  for (const group of groups) {
    for (const suffix of suffixes) {
      const name = group + suffix;
      if (table.columns.includes(name)) out.push({ name, group, suffix });
    }
  }
  return out;
}

export function columnTitle(column, mode) {
  const metric = METRICS[column.group] ?? { label: column.group, help: column.group };
  const which = SUFFIX_NAMES[mode][column.suffix] ?? column.suffix;
  return { label: which ? `${metric.label} (${which})` : metric.label, help: metric.help };
}

// A row that answers nothing: every effect ≈ 0 (before and after, left and right), or a head at
// the first query token, whose attention probability is 1 on every prompt.
export function isTrivial(node, table) {
  if (node.node_type === "attention_head" && node.token === 0) return true;
  const effects = table.columns.filter((c) => EFFECTS.some((e) => c.startsWith(e)));
  if (effects.length === 0) return false;
  return effects.every((c) => Math.abs(node.values[c] ?? 0) < TINY);
}

function sortKey(value, order) {
  if (value === null || value === undefined || Number.isNaN(value)) return Infinity;
  if (order === "abs") return -Math.abs(value);
  return order === "asc" ? value : -value;
}

// Rows in display order; ties (and undefined values, last) keep the server's top-k order.
export function sortRows(nodes, column, order) {
  const indexed = nodes.map((node, i) => ({ node, i, key: sortKey(node.values[column], order) }));
  indexed.sort((a, b) => (a.key === b.key ? a.i - b.i : a.key < b.key ? -1 : 1));
  return indexed.map((x) => x.node);
}

// Which rows pass the view's filters, and how many trivial rows are hidden.
export function visibleRows(table, view) {
  const search = view.search.trim().toLowerCase();
  let hidden = 0;
  const rows = table.nodes.filter((node) => {
    if (view.type && node.node_type !== view.type) return false;
    if (search && !node.id.toLowerCase().includes(search)) return false;
    if (!view.trivial && isTrivial(node, table)) {
      hidden += 1;
      return false;
    }
    return true;
  });
  return { rows, hidden };
}

// Per column and node type, the largest |value|: colours compare nodes of one type.
function scales(rows, columns) {
  const out = {};
  for (const { name } of columns) {
    out[name] = {};
    for (const node of rows) {
      const v = Math.abs(node.values[name] ?? 0);
      out[name][node.node_type] = Math.max(out[name][node.node_type] ?? 0, v);
    }
  }
  return out;
}

function truncate(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// view: {sort, order, type, search, trivial, full}; on: {sort(column), actions(node) -> [el]}
export function renderTable(target, table, view, on) {
  const mode = tableMode(table);
  const columns = shownColumns(table, view.full);
  const sortColumn = table.columns.includes(view.sort) ? view.sort : DEFAULT_SORT;
  const { rows, hidden } = visibleRows(table, view);
  const sorted = sortRows(rows, sortColumn, view.order);
  const scale = scales(sorted, columns);
  const explained = table.nodes.some((n) => n.explanation !== undefined && n.explanation !== null);
  const arrows = { abs: " ▼|x|", desc: " ▼", asc: " ▲" };
  const header = el("tr", {},
    el("th", { class: "id", title: "node id: click it for the component's page" }, "node"),
    el("th", { class: "name" }, "name"),
    ...columns.map((column) => {
      const { label, help } = columnTitle(column, mode);
      const arrow = sortColumn === column.name ? arrows[view.order] : "";
      return el("th", {
        class: "sortable num", dataset: { column: column.name },
        title: `${help}\nClick: sort (largest |value|, largest, smallest).`,
        onclick: () => on.sort(column.name),
      }, label + arrow);
    }),
    explained ? el("th", { title: "an explanation of the component and its score" }, "explanation") : null,
    el("th", { class: "actions" }, "actions"));
  const body = sorted.map((node) => el("tr", { dataset: { node: node.id, type: node.node_type } },
    el("td", { class: "id" }, componentLink(node.id, node.component)),
    el("td", { class: "name", title: node.name }, node.name),
    ...columns.map(({ name }) => {
      const value = node.values[name];
      const cell = el("td", {
        class: "num", dataset: { column: name }, title: value === null ? "undefined" : String(value),
      }, fmt(value));
      cell.style.background = colour(value, scale[name][node.node_type]);
      return cell;
    }),
    explained ? explanationCell(node) : null,
    el("td", { class: "actions" }, el("div", {}, ...on.actions(node)))));
  target.replaceChildren(el("thead", {}, header), el("tbody", {}, ...body));
  return { shown: sorted.length, hidden, total: table.nodes.length };
}

function explanationCell(node) {
  if (node.explanation === undefined || node.explanation === null) return el("td", { class: "explanation" }, "");
  const score = node.explanation_score === undefined || node.explanation_score === null ? ""
    : ` (${fmt(node.explanation_score)})`;
  return el("td", { class: "explanation", title: node.explanation + score },
    truncate(node.explanation, 48) + score);
}
