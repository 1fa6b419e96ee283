// Investigations as files (docs/investigations.md), on every page: records each API request
// and its response (common.js's apiListeners), "Save" downloads them as one JSON file with the
// model's fingerprint, "Open" restores a saved file: the page goes to the URL of the file's last
// step, and when it sends that step's request again the live response is compared with the
// saved one (numbers within a tolerance, node lists by id, as `tdb replay` does).
//
// The record lives in the tab's sessionStorage, so it follows the investigation from page to
// page (the node table, a component, the dataset view) and survives a reload; a new tab starts
// a new one. Open replaces it with the file's steps, so a Save after Open holds the old steps
// and the new ones.

import { $, apiListeners, el, getJson } from "/static/common.js";

const FORMAT = "tdb-investigation";
const VERSION = 1;
const OPENED = "tdb-investigation-opened"; // sessionStorage keys: the file Open restores,
const STEPS = "tdb-investigation-steps"; // and the record
const RTOL = 1e-4;
const ATOL = 1e-5;
const NOT_COMPARED_MS = 60_000;

let steps = stored();
let opened = null; // {name, created, count, model, last, checked}
let modelInfo = null;

// ---- recording ------------------------------------------------------------------------------

apiListeners.push((step) => {
  if (step.status === 503) return; // the server was busy: no result, the page retries
  if (opened && !opened.checked && restoredStep(step)) return; // the view Open restored
  steps.push({ ...step, time: new Date().toISOString() });
  store();
});

function stored() {
  try {
    const value = JSON.parse(sessionStorage.getItem(STEPS) ?? "[]");
    return Array.isArray(value) ? value : [];
  } catch {
    return [];
  }
}

// Past the browser's quota (a few MB) the record stays in this page only: Save still has it.
function store() {
  try {
    sessionStorage.setItem(STEPS, JSON.stringify(steps));
  } catch {
    sessionStorage.removeItem(STEPS);
  }
}

function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

// ---- Save -----------------------------------------------------------------------------------

async function save() {
  try {
    modelInfo = modelInfo ?? (await getJson("/api/model"));
  } catch (error) {
    banner(`cannot save: the server does not answer (${error.message})`, "error");
    return;
  }
  const created = new Date().toISOString();
  const doc = {
    format: FORMAT,
    version: VERSION,
    model: { name: modelInfo.name, fingerprint: modelInfo.fingerprint },
    tdb_version: modelInfo.tdb_version,
    created,
    server: { max_prompt_tokens: modelInfo.max_prompt_tokens },
    steps,
  };
  const blob = new Blob([JSON.stringify(doc, null, 1)], { type: "application/json" });
  const link = el("a", {
    href: URL.createObjectURL(blob),
    download: `tdb-investigation-${created.slice(0, 19).replace(/[-:]/g, "").replace("T", "-")}.json`,
  });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// ---- Open -----------------------------------------------------------------------------------

function checked(doc) {
  if (!doc || typeof doc !== "object" || doc.format !== FORMAT) {
    throw new Error(`not an investigation (a file saved by this page's Save has "format": "${FORMAT}")`);
  }
  if (doc.version !== VERSION) {
    throw new Error(`investigation format version ${doc.version}; this page reads version ${VERSION}`);
  }
  if (!Array.isArray(doc.steps) || !doc.model || typeof doc.created !== "string") {
    throw new Error("steps, model or created is missing");
  }
  for (const [i, step] of doc.steps.entries()) {
    if (!step || typeof step.route !== "string" || typeof step.page !== "string" ||
        !step.page.startsWith("/") || step.page.startsWith("//")) {
      throw new Error(`steps[${i}] has no route or no page path`);
    }
  }
  return doc;
}

async function open(file) {
  let doc;
  try {
    doc = checked(JSON.parse(await file.text()));
  } catch (error) {
    banner(`cannot open ${file.name}: ${error.message}`, "error");
    return;
  }
  const last = doc.steps.at(-1);
  const state = {
    name: file.name, created: doc.created, count: doc.steps.length, model: doc.model,
    steps: doc.steps,
  };
  try {
    sessionStorage.setItem(OPENED, JSON.stringify(state));
  } catch (error) {
    banner(`cannot open ${file.name}: too large for this browser's session storage ` +
      `(${error.message})`, "error");
    return;
  }
  const target = last ? last.page : window.location.pathname;
  if (target === window.location.pathname + window.location.search) window.location.reload();
  else window.location.assign(target);
}

function restoreOpened() {
  const raw = sessionStorage.getItem(OPENED);
  if (!raw) return;
  sessionStorage.removeItem(OPENED);
  const state = JSON.parse(raw);
  steps = state.steps;
  store();
  const last = steps.at(-1) ?? null;
  opened = { ...state, last, checked: !last, note: "" };
  delete opened.steps;
  if (last) {
    opened.note = "recomputing the restored view…";
    setTimeout(notCompared, NOT_COMPARED_MS);
  }
  showOpened();
  checkModel();
}

// A page whose URL does not hold its whole request (an uploaded JSONL file) sends none of the
// saved ones again.
function notCompared() {
  if (opened.checked) return;
  opened.checked = true;
  opened.note = `the page sent none of the file's requests again within ${NOT_COMPARED_MS / 1000} s ` +
    "(its URL may not hold the whole request, e.g. an uploaded file): not compared";
  showOpened();
}

async function checkModel() {
  try {
    modelInfo = modelInfo ?? (await getJson("/api/model"));
  } catch {
    return;
  }
  if (modelInfo.fingerprint !== opened.model.fingerprint) {
    opened.modelNote = `saved with model ${opened.model.name} ` +
      `(${short(opened.model.fingerprint)}), now ${modelInfo.name} (${short(modelInfo.fingerprint)})`;
    showOpened();
  }
}

// The first live request equal to a saved one is the restored view: compare its response.
function restoredStep(step) {
  const key = canonical([step.route, step.request]);
  const saved = [...steps].reverse().find((s) => canonical([s.route, s.request]) === key);
  if (!saved) return false;
  opened.checked = true;
  const found = differences(
    { status: saved.status, response: comparable(saved) },
    { status: step.status, response: comparable(step) },
  );
  opened.note = found.length === 0
    ? "the restored view matches the saved result"
    : `the restored view differs from the saved result beyond float tolerance (` +
      found.slice(0, 3).map((d) => `${d.path}: saved ${shown(d.saved)}, now ${shown(d.now)}`)
        .join("; ") + (found.length > 3 ? `; ${found.length - 3} more` : "") + ")";
  showOpened(found.length === 0 ? "" : "changed");
  return true;
}

function comparable(step) {
  return step.status === 200 ? step.response : { error: step.response?.error };
}

function showOpened(kind = "") {
  const saved = new Date(opened.created);
  const date = Number.isNaN(saved.getTime()) ? opened.created : saved.toLocaleString();
  const steps = `${opened.count} step${opened.count === 1 ? "" : "s"}`;
  const parts = [`opened investigation ${opened.name} (${steps}, saved ${date})`];
  if (opened.modelNote) parts.push(opened.modelNote);
  if (opened.note) parts.push(opened.note);
  banner(parts.join(" — "), kind || (opened.modelNote ? "changed" : ""));
}

// ---- comparing (the rules of tdb.replay.differences) ----------------------------------------

const NUMBER = /-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?/g;

function close(a, b) {
  return a === b || Math.abs(a - b) <= ATOL + RTOL * Math.max(Math.abs(a), Math.abs(b));
}

function sameText(a, b) {
  if (a === b) return true;
  if (a.split(NUMBER).join("\u0000") !== b.split(NUMBER).join("\u0000")) return false;
  const x = a.match(NUMBER) ?? [];
  const y = b.match(NUMBER) ?? [];
  return x.length === y.length && x.every((v, i) => close(Number(v), Number(y[i])));
}

function ids(items) {
  if (!items.length || !items.every((x) => x && typeof x === "object" && typeof x.id === "string")) {
    return null;
  }
  const keys = items.map((x) => x.id);
  return new Set(keys).size === keys.length ? keys : null;
}

function differences(saved, now, path = "") {
  if (typeof saved === "number" && typeof now === "number") {
    return close(saved, now) ? [] : [{ path, saved, now }];
  }
  if (typeof saved === "string" && typeof now === "string") {
    return sameText(saved, now) ? [] : [{ path, saved, now }];
  }
  if (Array.isArray(saved) && Array.isArray(now)) {
    const [a, b] = [ids(saved), ids(now)];
    const found = [];
    if (a && b) {
      const byId = new Map(now.map((x) => [x.id, x]));
      for (const item of saved) {
        const where = `${path}[${item.id}]`;
        if (byId.has(item.id)) found.push(...differences(item, byId.get(item.id), where));
        else found.push({ path: where, saved: "present", now: "(absent)" });
      }
      for (const key of b) if (!a.includes(key)) found.push({ path: `${path}[${key}]`, saved: "(absent)", now: "present" });
      return found;
    }
    for (let i = 0; i < Math.min(saved.length, now.length); i++) {
      found.push(...differences(saved[i], now[i], `${path}[${i}]`));
    }
    if (saved.length !== now.length) found.push({ path: `${path}.length`, saved: saved.length, now: now.length });
    return found;
  }
  if (saved && now && typeof saved === "object" && typeof now === "object" &&
      !Array.isArray(saved) && !Array.isArray(now)) {
    const found = [];
    for (const key of new Set([...Object.keys(saved), ...Object.keys(now)])) {
      const where = path ? `${path}.${key}` : key;
      if (!(key in now)) found.push({ path: where, saved: saved[key], now: "(absent)" });
      else if (!(key in saved)) found.push({ path: where, saved: "(absent)", now: now[key] });
      else found.push(...differences(saved[key], now[key], where));
    }
    return found;
  }
  return canonical(saved) === canonical(now) ? [] : [{ path, saved, now }];
}

function shown(value) {
  const text = typeof value === "object" && value !== null ? canonical(value) : String(value);
  return text.length <= 40 ? text : text.slice(0, 37) + "...";
}

function short(fingerprint) {
  return String(fingerprint).replace(/^sha256:/, "").slice(0, 12);
}

// ---- the buttons and the banner -------------------------------------------------------------

function banner(text, kind = "") {
  const box = $("investigation-banner");
  box.textContent = text;
  box.dataset.kind = kind;
  box.style.background = kind === "error" || kind === "changed" ? "#fdecea" : "#eef6ee";
  box.hidden = !text;
}

function setup() {
  const input = el("input", {
    id: "open-investigation", type: "file", accept: ".json,application/json", hidden: "",
    onchange: () => {
      if (input.files.length) open(input.files[0]);
      input.value = "";
    },
  });
  const tools = el("span", { id: "investigation-tools", style: "margin-left: auto; display: flex; gap: 0.4em" },
    el("button", {
      id: "save-investigation", type: "button", class: "secondary",
      title: "download every request of this investigation and its results as one JSON file",
      onclick: save,
    }, "Save"),
    el("button", {
      id: "open-button", type: "button", class: "secondary",
      title: "open a saved investigation: restores the page and recomputes its last view",
      onclick: () => input.click(),
    }, "Open"),
    input,
  );
  const header = document.querySelector("header");
  const box = el("div", {
    id: "investigation-banner", role: "status", hidden: "",
    style: "padding: 0.4em 0.8em; margin: 0.4em 0; border-radius: 4px",
  });
  if (header) {
    header.append(tools);
    header.after(box);
  } else {
    document.body.prepend(tools, box);
  }
  restoreOpened();
}

setup();
