// The equiserve page: reads GET /v1/models and offers each served model in the panel of its task.
// Plain JS, no build step, nothing from another origin.
import * as cartpole from "./cartpole.js";
import * as gridworld from "./gridworld.js";

const $ = (selector, root = document) => root.querySelector(selector);
const KEY_STORAGE = "equiserve-api-key";
const METHOD_NAMES = { vanilla: "vanilla", equitune: "equitune", equizero: "equizero", lambda: "λ-equitune" };
const TASK_TITLES = { classify: "classify", generate: "generate", translate: "translate", act: "act" };
// The README's default model: a newcomer meets the method on photos they know first.
const PREFERRED_MODEL = "imagenet-effnet-c4";

const state = {
  models: [],
  model: null,
  apiKey: sessionStorage.getItem(KEY_STORAGE),
  retry: null, // what to run again once an API key is given
};

// ---------------------------------------------------------------------------------------------
// small DOM helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function bar(fraction, className = "bar") {
  const width = `${(Math.max(0, Math.min(1, fraction)) * 100).toFixed(1)}%`;
  const inner = el("span");
  inner.style.width = width;
  return el("span", { class: className, role: "presentation" }, inner);
}

/** One copy's card: `head` above its name (a picture), `body` below its λ (what the copy said). */
function copyCard(t, selected, { head = null, body = [], data = {} } = {}) {
  return el("article", { class: selected ? "card selected" : "card", "data-testid": "copy", "data-transform": t.name,
    "data-lambda": t.lambda === undefined ? undefined : String(t.lambda), ...data },
  head,
  el("p", { class: "name" }, t.name, selected ? el("span", { class: "badge" }, "equizero's pick") : null),
  el("div", { class: "lambda" }, el("span", {}, "λ"), el("span", { class: "num" }, fmt(t.lambda, 3))),
  bar(t.lambda || 0),
  ...body);
}

/** The next of `examples` (strings) that differs from `current`: each press shows something new. */
function nextExample(examples, current, counter) {
  for (let i = 0; i < examples.length; i++) {
    const example = examples[(counter.next + i) % examples.length];
    if (example !== current) {
      counter.next = (counter.next + i + 1) % examples.length;
      return example;
    }
  }
  return examples[0];
}

const fmt = (x, digits = 4) => (typeof x === "number" ? x.toFixed(digits) : "…");
const actionText = (actions) => (Array.isArray(actions) ? actions.join(" ") : String(actions));

function showError(panel, error) {
  const box = $('[data-testid="error"]', panel);
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = error.message || String(error);
}

function showTiming(panel, timing, roundTripMs) {
  const line = $('[data-testid="timing"]', panel);
  if (!timing) {
    line.textContent = "";
    return;
  }
  line.textContent = `queue ${timing.queue_ms.toFixed(1)} ms · inference ${timing.inference_ms.toFixed(1)} ms`
    + ` · batch size ${timing.batch_size}` + (roundTripMs === undefined ? "" : ` · round trip ${roundTripMs.toFixed(0)} ms`);
}

// ---------------------------------------------------------------------------------------------
// the API: errors are the server's own message; a 401 asks for the key and runs the request again

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.error ? body.error : null;
    const message = detail ? detail.message : `HTTP ${status}`;
    super(detail && detail.request_id ? `${message} (${detail.code}, request ${detail.request_id})` : message);
    this.status = status;
  }
}

async function request(path, { json, form, signal } = {}) {
  const headers = {};
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method: body === undefined ? "GET" : "POST", headers, body, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error(`could not reach the server: ${error.message}`);
  }
  if (!response.ok) {
    let parsed = null;
    try {
      parsed = await response.json();
    } catch {
      // not JSON: the status says it
    }
    throw new ApiError(response.status, parsed);
  }
  return response;
}

/** Run `action` (async), showing its error in `panel`; on a 401 ask for the key and call `retry`
 * once it is given. Resolves to whether the action succeeded. */
async function guarded(panel, action, retry) {
  showError(panel, null);
  try {
    await action();
    return true;
  } catch (error) {
    if (error.name === "AbortError") return false;
    if (error.status === 401) {
      state.retry = retry;
      askForKey();
    }
    showError(panel, error);
    return false;
  }
}

function askForKey() {
  const form = $("#api-key");
  form.hidden = false;
  form.elements.key.focus();
}

$("#api-key").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  state.apiKey = form.elements.key.value.trim();
  // The key lives in this page's memory; in sessionStorage (this tab only) if asked, never longer.
  if (form.elements.remember.checked) sessionStorage.setItem(KEY_STORAGE, state.apiKey);
  else sessionStorage.removeItem(KEY_STORAGE);
  form.elements.key.value = "";
  form.hidden = true;
  const retry = state.retry;
  state.retry = null;
  if (retry) retry();
});

// ---------------------------------------------------------------------------------------------
// models and methods

async function loadModels() {
  const select = $("#model");
  try {
    const response = await request("/v1/models");
    state.models = (await response.json()).models;
  } catch (error) {
    const box = $("#load-error");
    box.hidden = false;
    box.textContent = `GET /v1/models failed: ${error.message}`;
    select.replaceChildren(el("option", {}, "no models"));
    return;
  }
  select.replaceChildren();
  const tasks = [...new Set(state.models.map((m) => m.task))].sort(
    (a, b) => (a in TASK_TITLES ? Object.keys(TASK_TITLES).indexOf(a) : 99)
      - (b in TASK_TITLES ? Object.keys(TASK_TITLES).indexOf(b) : 99),
  );
  for (const task of tasks) {
    const group = el("optgroup", { label: TASK_TITLES[task] || task });
    for (const model of state.models.filter((m) => m.task === task)) {
      group.append(el("option", { value: model.name }, model.name));
    }
    select.append(group);
  }
  if (!state.models.length) {
    select.append(el("option", {}, "no models served"));
    return;
  }
  select.disabled = false;
  const wanted = wantedModel();
  select.value = state.models.some((m) => m.name === wanted) ? wanted : defaultModel(state.models).name;
  selectModel(select.value);
}

/** The model the address names: `#model=` (what this page writes), else `?model=` (a link). */
function wantedModel() {
  return new URLSearchParams(location.hash.slice(1)).get("model")
    ?? new URLSearchParams(location.search).get("model");
}

/** The model a page without one named opens on: the README's default if served; else the classifier
 * with a fixed label set of the most labels (photos of everyday things mean something to it), then
 * any classifier, then the first model of the first task in the page's order; in each, the server's
 * order. Never the alphabetical first, which is whatever name happens to sort first. */
function defaultModel(models) {
  const preferred = models.find((m) => m.name === PREFERRED_MODEL);
  if (preferred) return preferred;
  const fixed = models.filter((m) => m.task === "classify" && !m.zero_shot);
  if (fixed.length) return fixed.reduce((best, m) => ((m.num_labels ?? 0) > (best.num_labels ?? 0) ? m : best));
  for (const task of Object.keys(TASK_TITLES)) {
    const first = models.find((m) => m.task === task);
    if (first) return first;
  }
  return models[0];
}

function selectModel(name) {
  const model = state.models.find((m) => m.name === name);
  state.model = model;
  // The choice lives in the address, so that a reload or a bookmark opens it again; a `?model=` of a
  // link is dropped, or it would contradict the fragment after the next choice.
  const query = new URLSearchParams(location.search);
  query.delete("model");
  const search = query.toString() ? `?${query}` : "";
  history.replaceState(null, "", `${location.pathname}${search}#model=${encodeURIComponent(name)}`);
  const methods = $("#method");
  methods.replaceChildren(...model.methods.map((m) => el("option", { value: m }, METHOD_NAMES[m] || m)));
  methods.value = model.default_method;
  methods.disabled = false;
  const facts = [model.task, `backbone ${model.backbone}`, `group ${model.group} (|G| = ${model.transforms.length})`,
    model.lambda_trained ? "trained λ-net" : "untrained λ (uniform)", `${model.runtime} on ${model.device}`];
  if (model.env) facts.push(`env ${model.env}`);
  $("#model-info").textContent = `${model.description ? model.description + " — " : ""}${facts.join(" · ")}`;
  const panels = { classify: "#classify", generate: "#generate", translate: "#translate", act: "#act" };
  for (const [task, selector] of Object.entries(panels)) $(selector).hidden = task !== model.task;
  $("#no-panel").hidden = model.task in panels;
  if (model.task === "classify") classifyPanel.modelChanged(model);
  if (model.task === "generate") generatePanel.modelChanged(model);
  if (model.task === "act") actPanel.modelChanged(model);
}

$("#model").addEventListener("change", (event) => selectModel(event.target.value));
window.addEventListener("hashchange", () => {
  const wanted = new URLSearchParams(location.hash.slice(1)).get("model");
  if (state.model && wanted !== state.model.name && state.models.some((m) => m.name === wanted)) {
    $("#model").value = wanted;
    selectModel(wanted);
  }
});
$("#method").addEventListener("change", () => {
  if (state.model && state.model.task === "classify") classifyPanel.resend();
});
$("#pickers").addEventListener("submit", (event) => event.preventDefault());
// The fragment holds the model: open the method's details without letting the link replace it.
$("#method-link").addEventListener("click", (event) => {
  event.preventDefault();
  const details = $("#about-method");
  details.open = true;
  details.scrollIntoView({ block: "nearest" });
  $("summary", details).focus();
});

const method = () => $("#method").value;

// ---------------------------------------------------------------------------------------------
// the image group, drawn as it acts: element (k, flip) = first flip left-right when flip, then
// rotate by k·90° counter-clockwise, as app/equivariance/groups.py (torch.rot90 on (H, W)).

function parseImageElement(name) {
  const flip = name.endsWith("hflip") || name === "vflip";
  if (name === "identity" || name === "hflip") return { k: 0, flip };
  if (name === "vflip") return { k: 2, flip };
  const match = /^rot(90|180|270)/.exec(name);
  if (!match) throw new Error(`unknown image transform ${name}`);
  return { k: Number(match[1]) / 90, flip };
}

/** The centred crop of the server's preprocessing (app/backbones/preprocess.py crop_box). */
function cropBox(height, width) {
  const short = Math.min(height, width);
  const cropH = short + ((height - short) % 2);
  const cropW = short + ((width - short) % 2);
  return { top: Math.floor((height - cropH) / 2), left: Math.floor((width - cropW) / 2), cropH, cropW };
}

function drawCopy(canvas, source, name) {
  const { k, flip } = parseImageElement(name);
  const { top, left, cropH, cropW } = cropBox(source.height, source.width);
  const size = canvas.width;
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.clearRect(0, 0, size, size);
  // The last transform set applies first to the drawn pixels: flip, then rotate (counter-clockwise
  // on screen is a negative angle in canvas coordinates, whose y axis points down).
  ctx.translate(size / 2, size / 2);
  ctx.rotate((-k * Math.PI) / 2);
  if (flip) ctx.scale(-1, 1);
  ctx.translate(-size / 2, -size / 2);
  ctx.drawImage(source, left, top, cropW, cropH, 0, 0, size, size);
  ctx.restore();
}

/** Rotate the pixels by 90° counter-clockwise, exactly (no resampling): what rot90 does. */
function rotatePixels(source) {
  const { width, height } = source;
  const input = source.getContext("2d").getImageData(0, 0, width, height);
  const rotated = document.createElement("canvas");
  rotated.width = height;
  rotated.height = width;
  const ctx = rotated.getContext("2d", { willReadFrequently: true }); // it may be rotated again
  const output = ctx.createImageData(height, width);
  const from = new Uint32Array(input.data.buffer);
  const to = new Uint32Array(output.data.buffer);
  // out[r][c] = in[c][W-1-r]  (np.rot90: the right column becomes the top row)
  for (let r = 0; r < width; r++) {
    const column = width - 1 - r;
    for (let c = 0; c < height; c++) to[r * height + c] = from[c * width + column];
  }
  ctx.putImageData(output, 0, 0);
  return rotated;
}

// ---------------------------------------------------------------------------------------------
// classify

const classifyPanel = (() => {
  const panel = $("#classify");
  const current = { source: null, blob: null, fileName: null, rotations: 0, label: "" };
  let previous = null; // the last answer and what produced it, for the rotation check
  let inflight = null;

  function modelChanged(model) {
    $("#labels-field").hidden = !model.zero_shot;
    drawCards(null);
    resend();
  }

  function resend() {
    if (current.blob) send(false);
  }

  async function loadPhoto(blob, label) {
    const url = URL.createObjectURL(blob);
    try {
      const image = new Image();
      image.src = url;
      await image.decode();
      const canvas = document.createElement("canvas");
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
      canvas.getContext("2d", { willReadFrequently: true }).drawImage(image, 0, 0);
      Object.assign(current, { source: canvas, blob, fileName: blob.name || "photo", rotations: 0, label });
    } catch {
      showError(panel, new Error(`${label}: the browser cannot decode this file as an image`));
      return;
    } finally {
      URL.revokeObjectURL(url);
    }
    previous = null;
    $("#rotate").disabled = false;
    send(false);
  }

  async function rotate() {
    if (!current.source) return;
    const rotated = rotatePixels(current.source);
    const blob = await new Promise((resolve) => rotated.toBlob(resolve, "image/png"));
    Object.assign(current, { source: rotated, blob, fileName: "rotated.png", rotations: current.rotations + 1 });
    send(true);
  }

  function drawPreview() {
    const canvas = $("#preview");
    const { source } = current;
    const scale = Math.min(canvas.width / source.width, canvas.height / source.height);
    const w = source.width * scale, h = source.height * scale;
    const x = (canvas.width - w) / 2, y = (canvas.height - h) / 2;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(source, x, y, w, h);
    const { top, left, cropH, cropW } = cropBox(source.height, source.width);
    ctx.strokeStyle = "#f5b700";
    ctx.lineWidth = 2;
    ctx.strokeRect(x + left * scale, y + top * scale, cropW * scale, cropH * scale);
    const turned = current.rotations % 4 ? `, rotated ${current.rotations * 90}° counter-clockwise` : "";
    $("#preview-caption").textContent = `${current.label} (${source.width}×${source.height}${turned}); `
      + "the frame is the centre crop the model sees";
    $("#photo-row").hidden = false;
  }

  /** The |G| cards: pictures first (drawn here), numbers once the answer comes. */
  function drawCards(answer) {
    const box = $("#copies");
    const model = state.model;
    box.replaceChildren();
    const show = Boolean(current.source) && model.task === "classify";
    $("#copies-title").hidden = !show;
    $("#copies-help").hidden = !show;
    if (!show) return;
    const transforms = answer ? answer.transforms : model.transforms.map((name) => ({ name }));
    for (const t of transforms) {
      const canvas = el("canvas", { width: 160, height: 160, role: "img", "aria-label": `the photo after ${t.name}` });
      drawCopy(canvas, current.source, t.name);
      const selected = answer && answer.selected_transform === t.name;
      const card = copyCard(t, selected, { head: canvas, body: [
        el("p", { class: "own" }, t.top_label === undefined ? "…" : t.top_label,
          el("span", { class: "score" }, t.top_score === undefined ? "" : ` ${fmt(t.top_score, 3)}`)),
        bar(t.top_score || 0, "bar score-bar")] });
      box.append(card);
    }
  }

  function drawAnswer(answer, sent) {
    const top = answer.predictions[0];
    const prediction = $("#prediction");
    prediction.textContent = top.label;
    // for tests and scripts: which request this answer is
    Object.assign(prediction.dataset, { score: String(top.score), method: sent.method, rotations: sent.rotations });
    $("#prediction-score").textContent = fmt(top.score);
    $("#topk").replaceChildren(...answer.predictions.map((p) => el("li", {},
      el("span", {}, `${p.label} `), el("span", { class: "score num" }, fmt(p.score)), bar(p.score, "bar score-bar"))));
    const check = $("#rotation-check");
    const comparable = sent.rotated && previous && previous.key === sent.key;
    check.hidden = !comparable;
    if (!comparable) return;
    const before = previous.answer, methodName = METHOD_NAMES[sent.method] || sent.method;
    const same = before.predictions[0].label === top.label;
    const vanilla = (a) => a.transforms.find((t) => t.name === "identity");
    const verdict = (ok) => el("span", { class: ok ? "same" : "changed" }, ok ? "unchanged" : "changed");
    const parts = [`Rotated by 90°: ${methodName} said ${before.predictions[0].label} ${fmt(before.predictions[0].score)},`
      + ` now ${top.label} ${fmt(top.score)}: `, verdict(same)];
    const v0 = vanilla(before), v1 = vanilla(answer);
    if (sent.method !== "vanilla" && v0 && v1) {
      parts.push(`. Vanilla (the identity copy alone) said ${v0.top_label}, now ${v1.top_label}: `,
        verdict(v0.top_label === v1.top_label));
    }
    check.replaceChildren(...parts);
    check.dataset.unchanged = String(same);
  }

  async function send(rotated) {
    if (inflight) inflight.abort();
    const controller = new AbortController();
    inflight = controller;
    const model = state.model;
    const form = new FormData();
    form.append("image", current.blob, current.fileName);
    form.append("method", method());
    const topK = $("#top-k").value.trim();
    if (topK) form.append("top_k", topK);
    let labels = [];
    if (model.zero_shot) {
      labels = $("#labels").value.split(",").map((s) => s.trim()).filter(Boolean);
      for (const label of labels) form.append("labels", label);
    }
    const sent = { rotated, method: method(), rotations: current.rotations,
      key: JSON.stringify([model.name, method(), labels, topK]) };
    drawPreview();
    drawCards(null);
    const prediction = $("#prediction");
    prediction.textContent = "…";
    for (const key of ["score", "method", "rotations"]) delete prediction.dataset[key];
    $("#prediction-score").textContent = "";
    $("#topk").replaceChildren();
    $("#rotation-check").hidden = true;
    showTiming(panel, null);
    panel.setAttribute("aria-busy", "true");
    await guarded(panel, async () => {
      const started = performance.now();
      const response = await request(`/v1/models/${encodeURIComponent(model.name)}/classify`,
        { form, signal: controller.signal });
      const body = await response.json();
      if (inflight !== controller) return;
      const answer = body.results[0];
      drawCards(answer);
      drawAnswer(answer, sent);
      showTiming(panel, body.timing, performance.now() - started);
      previous = { key: sent.key, answer };
    }, () => send(rotated));
    if (inflight === controller) {
      inflight = null;
      panel.removeAttribute("aria-busy");
    }
  }

  const fileInput = $("#file");
  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (file) loadPhoto(file, file.name);
    fileInput.value = ""; // picking the same file again loads it again
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) loadPhoto(file, file.name);
  });
  for (const button of panel.querySelectorAll(".example")) {
    button.addEventListener("click", () => guarded(panel, async () => {
      const response = await fetch(button.dataset.src);
      if (!response.ok) throw new Error(`${button.dataset.src}: HTTP ${response.status}`);
      const blob = await response.blob();
      const name = button.dataset.src.split("/").pop();
      await loadPhoto(new File([blob], name, { type: blob.type }), name);
    }, () => button.click()));
  }
  $("#rotate").addEventListener("click", rotate);
  $("#labels").addEventListener("change", resend);
  $("#top-k").addEventListener("change", resend);
  return { modelChanged, resend };
})();

// ---------------------------------------------------------------------------------------------
// word swaps, shown client-side from the transform's name: a swap "swap:man<->woman" or
// "jump<->run", a cycle "cycle:a->b->c" or "a->b->c", a power "(a->b->c)^2", products joined by
// "·", the rightmost applied first. A text group has full word lists (man<->woman swaps he<->she
// too) and its answers carry each copy's prompt; this preview, before an answer, swaps the named
// words only. SCAN's names are the whole swap.

function wordMap(name) {
  const map = new Map();
  const power = name.match(/^\((.*)\)\^(\d+)$/);
  const [base, times] = power ? [power[1], Number(power[2])] : [name, 1];
  const body = base.replace(/^(swap|cycle):/, "");
  const parts = body.includes("<->") ? body.split("<->") : body.includes("->") ? body.split("->") : [];
  if (parts.some((word) => !/^[\p{L}\p{N}_]+$/u.test(word))) return map;
  parts.forEach((word, i) => map.set(word, parts[(i + times) % parts.length]));
  return map;
}

function swapWords(text, transformName) {
  if (transformName === "identity") return text;
  let out = text;
  for (const factor of transformName.split("·").reverse()) {
    const map = wordMap(factor);
    if (!map.size) return null;
    out = out.replace(/[\p{L}\p{N}_]+/gu, (word) => {
      if (map.has(word)) return map.get(word);
      const lower = word[0].toLowerCase() + word.slice(1);
      if (word !== lower && map.has(lower)) {
        const swapped = map.get(lower);
        return swapped[0].toUpperCase() + swapped.slice(1);
      }
      return word;
    });
  }
  return out;
}

function copyItem(name, lambda, text, selected, unchanged = false) {
  return el("li", { "data-testid": "copy", "data-transform": name,
    "data-lambda": lambda === undefined ? undefined : String(lambda), "data-unchanged": unchanged ? "true" : undefined,
    class: selected ? "selected" : undefined },
  el("span", { class: "swapped" }, text === null ? "(words of this swap not named)" : text,
    selected ? el("span", { class: "badge" }, "equizero's pick") : null,
    unchanged ? el("span", { class: "badge unchanged" }, "unchanged") : null),
  el("span", { class: "num" }, `λ ${fmt(lambda, 3)}`),
  el("span", { class: "name" }, name),
  bar(lambda || 0));
}

/** Copies other than the identity that read the same input as the identity: their swap names none of its words. */
function unchangedCopies(transforms, inputOf) {
  const identity = transforms.find((t) => t.name === "identity");
  if (!identity || inputOf(identity) === null) return new Set();
  return new Set(transforms.filter((t) => t.name !== "identity" && inputOf(t) === inputOf(identity))
    .map((t) => t.name));
}

// ---------------------------------------------------------------------------------------------
// generate: the answer streamed as server-sent events over fetch

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// Prompts with words of the usual swap groups, and one with none (every swap leaves it unchanged).
const GENERATE_EXAMPLES = ["The woman said she", "The doctor was known for", "The Black man worked as",
  "The man worked as"];

const generatePanel = (() => {
  const panel = $("#generate");
  const form = $("#generate-form");
  const examples = { next: 0 };
  let controller = null;

  function listCopies(prompt, transforms, selected) {
    // Only the server's prompts tell unchanged copies apart: a swap's full word lists are the server's.
    const answered = transforms.every((t) => t.prompt !== undefined);
    const unchanged = answered ? unchangedCopies(transforms, (t) => t.prompt) : new Set();
    $("#unchanged-help").hidden = unchanged.size === 0;
    $("#text-copies").replaceChildren(...transforms.map((t) =>
      // A server that sends each copy's prompt (`prompt`) is shown as is; else the named words swapped here.
      copyItem(t.name, t.lambda, t.prompt ?? swapWords(prompt, t.name), selected === t.name, unchanged.has(t.name))));
  }

  function modelChanged(model) {
    listCopies(form.elements.prompt.value, model.transforms.map((name) => ({ name })), null);
  }

  async function generate() {
    if (controller) controller.abort();
    controller = new AbortController();
    const mine = controller;
    const model = state.model;
    const prompt = form.elements.prompt.value;
    const body = { prompt, method: method(), stream: true };
    for (const field of ["max_new_tokens", "temperature", "seed"]) {
      const value = form.elements[field].value.trim();
      if (value !== "") body[field] = Number(value);
    }
    if (form.elements.relaxed.checked) body.relaxed = true;
    $("#prompt-echo").textContent = prompt;
    const output = $("#generated");
    output.textContent = "";
    delete output.dataset.done;
    $("#generate-meta").textContent = "";
    showTiming(panel, null);
    listCopies(prompt, model.transforms.map((name) => ({ name })), null);
    $("#generate-stop").disabled = false;
    $("#generate-run").disabled = true;
    await guarded(panel, async () => {
      const started = performance.now();
      const response = await request(`/v1/models/${encodeURIComponent(model.name)}/generate`,
        { json: body, signal: mine.signal });
      for await (const { event, data } of serverSentEvents(response)) {
        if (event === "token") {
          output.textContent += data.delta ?? data.text;
        } else if (event === "done") {
          output.textContent = data.text;
          output.dataset.done = "true";
          listCopies(prompt, data.transforms, data.selected_transform);
          $("#generate-meta").textContent = `${data.usage.completion_tokens} tokens · finished: ${data.finish_reason}`
            + ` · method ${METHOD_NAMES[data.method] || data.method} · seed ${data.seed} · frame ${data.frame}`;
          showTiming(panel, data.timing, performance.now() - started);
        } else if (event === "error") {
          throw new ApiError(200, data);
        }
      }
    }, generate);
    if (controller === mine) {
      controller = null;
      $("#generate-stop").disabled = true;
      $("#generate-run").disabled = false;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  form.elements.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.elements.prompt.addEventListener("input", () => {
    if (!controller && state.model) modelChanged(state.model);
  });
  $("#generate-stop").addEventListener("click", () => {
    if (controller) controller.abort();
    controller = null;
    $("#generate-stop").disabled = true;
    $("#generate-run").disabled = false;
  });
  $("#generate-example").addEventListener("click", () => {
    form.elements.prompt.value = nextExample(GENERATE_EXAMPLES, form.elements.prompt.value, examples);
    generate();
  });
  return { modelChanged };
})();

// ---------------------------------------------------------------------------------------------
// translate (SCAN)

// SCAN commands of every kind (and, after, twice, around, opposite); the first has no jump or run,
// so a jump<->run swap leaves it unchanged.
const TRANSLATE_EXAMPLES = ["walk opposite left thrice\njump around right and look twice",
  "run after jump left\nturn around left twice", "look right twice after walk\njump"];

(() => {
  const panel = $("#translate");
  const form = $("#translate-form");
  const examples = { next: 0 };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    translate();
  });
  $("#translate-example").addEventListener("click", () => {
    form.elements.commands.value = nextExample(TRANSLATE_EXAMPLES, form.elements.commands.value, examples);
    translate();
  });

  function translate() {
    const model = state.model;
    const commands = form.elements.commands.value.split("\n").map((s) => s.trim()).filter(Boolean);
    $("#translations").replaceChildren();
    $("#translate-unchanged-help").hidden = true;
    showTiming(panel, null);
    guarded(panel, async () => {
      const started = performance.now();
      const response = await request(`/v1/models/${encodeURIComponent(model.name)}/translate`,
        { json: { commands, method: method() } });
      const body = await response.json();
      $("#translations").replaceChildren(...body.results.map((result, i) => el("div", { class: "translation",
        "data-testid": "translation" },
      el("p", {}, el("span", { class: "command" }, commands[i]), " → ",
        el("span", { "data-testid": "actions" }, actionText(result.actions))),
      el("div", { class: "cards" }, ...(() => {
        // SCAN's transform names are the whole swap: here the page's own swap is exact.
        const unchanged = unchangedCopies(result.transforms, (t) => swapWords(commands[i], t.name));
        return result.transforms.map((t) => {
          const swapped = swapWords(commands[i], t.name);
          return copyCard(t, result.selected_transform === t.name, {
            data: { "data-unchanged": unchanged.has(t.name) ? "true" : undefined }, body: [
              swapped === null ? null : el("p", { class: "own" }, swapped,
                unchanged.has(t.name) ? el("span", { class: "badge unchanged" }, "unchanged") : null),
              el("p", { class: "actions" }, actionText(t.actions))] });
        });
      })()))));
      $("#translate-unchanged-help").hidden = !$('#translations [data-unchanged="true"]');
      showTiming(panel, body.timing, performance.now() - started);
    }, translate);
  }
})();

// ---------------------------------------------------------------------------------------------
// act: a CartPole-v1 episode simulated here, each action asked from the server; for every
// environment, one observation sent as typed or as the card's example start state

const GRID_ENV = "equiserve/GridWorldC4-v0";

const actPanel = (() => {
  const panel = $("#act");
  const canvas = $("#env-canvas");
  const gridCanvas = $("#grid-canvas");
  let episode = null; // { stop: boolean }

  /** The name the model card gives action `i` (its environment's), else its number. */
  const actionName = (i) => state.model.actions?.[i] ?? `action ${i}`;

  /** The card's example: a start state the server computed with the environment itself. A server
   * whose card has none still gets one for CartPole, from gymnasium's reset rule (cartpole.js). */
  function exampleObservation(model) {
    if (Array.isArray(model.example_observation)) return model.example_observation;
    if (model.env === "CartPole-v1") return cartpole.observation(cartpole.reset(cartpole.rng(0)));
    return null;
  }

  function drawGrid(observation, move = null) {
    const shown = state.model.env === GRID_ENV && gridworld.gridSize(observation) !== null;
    gridCanvas.hidden = !shown;
    if (shown) gridworld.draw(gridCanvas, observation, move);
  }

  function modelChanged(model) {
    stop();
    const simulated = model.env === "CartPole-v1";
    $("#cartpole").hidden = !simulated;
    const env = model.env || "this environment";
    const dim = model.observation_dim ? `${model.observation_dim} numbers` : "a list of numbers";
    const actions = model.actions ? `; its actions: ${model.actions.join(", ")}` : "";
    const grid = model.env === GRID_ENV ? " (the agent, goal and wall planes of the grid, row by row)" : "";
    $("#act-env-note").textContent = `${simulated ? "Or ask for a single action. " : ""}An observation of ${env}`
      + ` is ${dim}${grid}${actions}. “Try an example” sends a start state of the environment.`;
    $("#act-example").hidden = exampleObservation(model) === null;
    $("#observation").value = "";
    gridCanvas.hidden = true;
    $("#act-summary").textContent = "";
    $("#act-copies").replaceChildren();
    showTiming(panel, null);
    if (simulated) {
      cartpole.draw(canvas, [0, 0, 0, 0]);
      $("#episode-status").textContent = "";
    }
  }

  async function act(observation) {
    const started = performance.now();
    const response = await request(`/v1/models/${encodeURIComponent(state.model.name)}/act`,
      { json: { observations: [observation], method: method() } });
    const body = await response.json();
    const result = body.results[0];
    const q = result.q_values.map((v, i) => `${actionName(i)} ${fmt(v, 3)}`).join(", ");
    const summary = $("#act-summary");
    summary.replaceChildren("action ", el("strong", { "data-testid": "action" }, actionName(result.action)),
      ` · Q-values: ${q}`);
    summary.dataset.action = String(result.action);
    $("#act-copies").replaceChildren(...result.transforms.map((t) => {
      return copyCard(t, result.selected_transform === t.name, { data: { "data-action": String(t.action) },
        body: [el("p", { class: "own" }, `its action: ${actionName(t.action)}`)] });
    }));
    showTiming(panel, body.timing, performance.now() - started);
    return result;
  }

  function stop() {
    if (episode) episode.stop = true;
    episode = null;
    $("#episode-play").disabled = false;
    $("#episode-stop").disabled = true;
  }

  async function play() {
    stop();
    const mine = { stop: false };
    episode = mine;
    $("#episode-play").disabled = true;
    $("#episode-stop").disabled = false;
    const seed = Number($("#episode-seed").value) || 0;
    const delay = Number($("#episode-speed").value);
    let s = cartpole.reset(cartpole.rng(seed));
    let steps = 0, terminated = false;
    const status = $("#episode-status");
    cartpole.draw(canvas, s);
    const played = await guarded(panel, async () => {
      while (!mine.stop && !terminated && steps < cartpole.CARTPOLE.maxSteps) {
        const { action } = await act(cartpole.observation(s));
        if (mine.stop) break;
        ({ state: s, terminated } = cartpole.step(s, action));
        steps += 1; // reward 1 per step, the terminating one included
        cartpole.draw(canvas, s);
        status.textContent = `step ${steps} · return ${steps}`;
        status.dataset.steps = String(steps);
        if (delay) await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }, play);
    if (episode !== mine) return; // stopped, or replaced by a new episode
    if (!played) {
      stop();
      return;
    }
    const end = terminated ? "the pole fell or the cart left the track" : "truncated at 500 steps";
    status.textContent = `seed ${seed}: return ${steps} (${end})`;
    status.dataset.steps = String(steps);
    status.dataset.done = "true";
    $("#episode-returns").append(el("li", {}, String(steps)));
    $("#episode-seed").value = String(seed + 1);
    stop();
  }

  $("#episode-play").addEventListener("click", play);
  $("#episode-stop").addEventListener("click", stop);
  $("#act-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(panel, async () => {
      let observation;
      try {
        observation = JSON.parse($("#observation").value);
      } catch {
        throw new Error("the observation must be a JSON list of numbers, e.g. [0.1, 0, -0.02, 0.3]");
      }
      drawGrid(observation);
      const result = await act(observation);
      drawGrid(observation, state.model.actions?.[result.action]);
    }, () => $("#act-form").requestSubmit());
  });
  $("#observation").addEventListener("input", () => {
    try {
      drawGrid(JSON.parse($("#observation").value));
    } catch {
      gridCanvas.hidden = true; // not yet a list: nothing to draw
    }
  });
  $("#act-example").addEventListener("click", () => {
    const example = exampleObservation(state.model);
    if (!example) return;
    $("#observation").value = JSON.stringify(example);
    $("#act-form").requestSubmit();
  });
  return { modelChanged };
})();

// For the browser tests: the CartPole simulation, to compare with gymnasium's.
window.equiserveCartPole = cartpole;

loadModels();
