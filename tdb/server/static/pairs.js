// The prompt pairs the dataset and circuit pages send: a built-in task (name, n, seed) or an
// uploaded JSONL file of records, read in the browser. Both pages hold the same controls
// (#task, #n, #seed, #file, #file-info, the radio buttons named "source").

import { $, el, getJson, postJson, showError, showModelInfo } from "/static/common.js";

let maxRecords = 512; // GET /api/tasks says
let upload = null; // { name, records, lines: the file line of each record }

function source() {
  return document.querySelector('input[name="source"]:checked').value;
}

// One JSON object a line, blank lines skipped; the first bad line is an error naming it.
export function parseJsonl(name, text) {
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
export function fileLines(message, body) {
  if (!upload || !body.dataset) return message;
  const line = (i) => upload.lines[i] ?? `record ${i + 1}`;
  return message
    .replace(/dataset line (\d+)/g, (_, n) => `${upload.name} line ${line(Number(n) - 1)}`)
    .replace(/dataset\.(\d+)\./g, (_, i) => `${upload.name} line ${line(Number(i))}: `);
}

// The request's `task` or `dataset`; an Error (for a person) when there is neither.
export function pairs() {
  if (source() === "file") {
    if (!upload) throw new Error("choose a JSONL file of prompt pairs (or a built-in task)");
    return { dataset: upload.records };
  }
  return {
    task: {
      name: $("task").value,
      n: Number.parseInt($("n").value, 10) || 16,
      seed: Number.parseInt($("seed").value, 10) || 0,
    },
  };
}

// A task's part of the URL (an uploaded file cannot be kept there).
export function writePairs(q, body) {
  q.set("task", body.task.name);
  q.set("n", body.task.n);
  q.set("seed", body.task.seed);
}

export function readPairs(q) {
  $("task").value = q.get("task");
  for (const key of ["n", "seed"]) if (q.has(key)) $(key).value = q.get(key);
  document.querySelector('input[name="source"][value="task"]').checked = true;
}

// Fills the task list and the limits from GET /api/tasks, and reads files as they are chosen.
export async function setupPairs() {
  $("file").addEventListener("change", readFile);
  const tasks = await getJson("/api/tasks");
  maxRecords = tasks.max_records;
  $("task").replaceChildren(...tasks.tasks.map((t) => el("option", { value: t }, t)));
  $("n").max = String(tasks.max_n);
}

// The pages' request cycle: build the body (an Error there is shown, nothing sent), keep it in
// the URL, POST it with a status line and the button disabled, and hand the answer to `show`;
// an answer to an older run is dropped. Returns the function that runs the form once.
export function pairsRunner({ route, status, request, writeUrl, show, onError }) {
  let runId = 0;
  return async function run() {
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
    $("status").textContent = status;
    $("run").disabled = true;
    try {
      const out = await postJson(route, body);
      if (id === runId) show(out);
    } catch (error) {
      if (id !== runId) return;
      if (onError) onError();
      showError(fileLines(error.message, body));
    } finally {
      if (id === runId) {
        $("status").textContent = "";
        $("run").disabled = false;
      }
    }
  };
}

// Wires the form and the browser's back/forward to `run`, shows the model, and runs the URL's
// request if it holds one. `readUrl()` fills the form from the URL (false: nothing there).
export async function startPairsPage({ form, run, readUrl, onModel }) {
  $(form).addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  window.addEventListener("popstate", () => {
    if (readUrl()) run();
  });
  try {
    const [info] = await Promise.all([getJson("/api/model"), setupPairs()]);
    if (onModel) onModel(info);
    showModelInfo(info);
  } catch (error) {
    showError(`cannot reach the tdb server: ${error.message}`);
    return;
  }
  if (readUrl()) await run();
}
