// What both pages use: DOM helpers, number formats, colours, requests, and component links.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  return node;
}

// Every POST and its answer go to these listeners (investigation.js records them for Save).
export const apiListeners = [];

export async function postJson(path, body) {
  const page = window.location.pathname + window.location.search;
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  for (const listen of apiListeners) listen({ route: path, request: body, status: response.status, response: data, page });
  if (!response.ok) throw new Error(data.error ?? `HTTP ${response.status}`);
  return data;
}

export async function getJson(path) {
  const response = await fetch(path);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error ?? `HTTP ${response.status}`);
  return data;
}

export function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// One number format everywhere: three decimals (a cell's tooltip holds the exact value); an
// exponent only past 1e5, where three decimals stop being readable.
export function fmt(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1e5) return value.toExponential(2);
  const text = value.toFixed(3);
  return text === "-0.000" ? "0.000" : text;
}

// Red for positive, blue for negative; the stronger, the larger |value| / scale.
export function colour(value, scale) {
  if (value === null || value === undefined || !scale) return "";
  const alpha = Math.min(1, Math.abs(value) / scale) * 0.65;
  return value >= 0 ? `rgba(220, 50, 47, ${alpha})` : `rgba(38, 110, 200, ${alpha})`;
}

// A node or component id linking to its component page. The link comes from the server
// (`component` in a row: tdb.nodes.component_link), never built here; null: plain text.
export function componentLink(id, href) {
  return href ? el("a", { href, title: "component page (dataset examples)" }, id) : id;
}

export function showModelInfo(info) {
  $("model-info").textContent = `${info.name} (${info.architecture}): ${info.n_layer} layers, ` +
    `${info.n_head} heads, d_mlp ${info.d_mlp}, prompts up to ${info.max_prompt_tokens} tokens`;
}
