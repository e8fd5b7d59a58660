// flux2 serve's page: submits jobs to /v1/jobs and follows their server-sent events. No framework, no build.
"use strict";
const $ = (id) => document.getElementById(id);
const refs = []; // {name, blob, url}: the reference images to send
const models = {}; // id → /v1/models entry: each model's defaults
let job = null; // the id of the job being followed

// A server started with --api-key wants it on every API call; the page asks once and remembers it.
function headers(extra = {}) {
  const key = localStorage.getItem("flux2-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    const key = prompt("This server needs an API key:");
    if (key) {
      localStorage.setItem("flux2-key", key);
      return api(path, options);
    }
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
}

function setSize(value) {
  const [w, h] = value.split("x");
  $("width").value = w;
  $("height").value = h;
}

function addRef(name, blob) {
  refs.push({ name, blob, url: URL.createObjectURL(blob) });
  drawRefs();
}

function drawRefs() {
  $("refs").replaceChildren(...refs.map((ref, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = ref.url;
    img.title = ref.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove";
    remove.onclick = (event) => {
      event.stopPropagation();
      URL.revokeObjectURL(ref.url);
      refs.splice(i, 1);
      drawRefs();
    };
    figure.append(img, remove);
    return figure;
  }));
}

function addCard(url, seed, settings, size) {
  const card = document.createElement("figure");
  card.className = "card";
  const img = document.createElement("img");
  img.src = url;
  img.alt = settings.prompt;
  const text = document.createElement("figcaption");
  text.className = "settings";
  const parts = [settings.prompt, settings.model, `seed ${seed}`, size];
  if (settings.steps) parts.push(`${settings.steps} steps`);
  if (settings.guidance != null) parts.push(`guidance ${settings.guidance}`);
  if (settings.files && settings.files.length) parts.push(`refs: ${settings.files.join(", ")}`);
  text.textContent = parts.join(" · ");
  const use = document.createElement("button");
  use.type = "button";
  use.textContent = "use as reference";
  use.onclick = async () => addRef(`flux2-${seed}.png`, await (await fetch(url)).blob());
  const download = document.createElement("a");
  download.href = url;
  download.download = `flux2-${seed}.${url.split(".").pop()}`;
  download.textContent = "download";
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(use, download);
  card.append(img, text, actions);
  $("gallery").prepend(card);
}

function request() {
  const fields = { model: $("model").value, prompt: $("prompt").value, size: `${$("width").value}x${$("height").value}`, n: $("n").value };
  if (!$("random").checked && $("seed").value !== "") fields.seed = $("seed").value;
  for (const [id, name] of [["steps", "steps"], ["guidance", "guidance"], ["negative", "negative_prompt"]]) {
    if ($(id).value !== "") fields[name] = $(id).value;
  }
  // About five previews a picture: each costs a few hundredths of the final decode.
  const steps = parseInt($("steps").value || models[fields.model].default_steps, 10);
  fields.preview_every = Math.max(1, Math.round(steps / 5));
  return fields;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const fields = request();
  let options;
  if (refs.length) { // references go as a multipart form, as /v1/images/edits takes them
    const form = new FormData();
    for (const [k, v] of Object.entries(fields)) form.append(k, v);
    for (const ref of refs) form.append("image[]", ref.blob, ref.name);
    options = { method: "POST", body: form };
  } else {
    for (const k of ["n", "seed", "steps", "preview_every"]) if (k in fields) fields[k] = parseInt(fields[k], 10);
    if ("guidance" in fields) fields.guidance = parseFloat(fields.guidance);
    options = { method: "POST", body: JSON.stringify(fields), headers: { "Content-Type": "application/json" } };
  }
  try {
    const submitted = await apiJson("/v1/jobs", options);
    await follow(submitted);
  } catch (e) {
    showError(e.message);
  }
}

// Server-sent events read through fetch (EventSource cannot send the API key header).
async function follow(submitted) {
  job = submitted.id;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("progress-text").textContent = `queued (position ${submitted.queue_position})`;
  const response = await api(`/v1/jobs/${job}/events`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const name = /^event: (.*)$/m.exec(block);
        const data = /^data: (.*)$/m.exec(block);
        if (name && data) onEvent(name[1], JSON.parse(data[1]), submitted);
      }
    }
  } finally {
    job = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function onEvent(name, data, submitted) {
  const text = $("progress-text");
  if (name === "started") {
    $("progress").max = data.total;
    text.textContent = "encoding the prompt…";
  } else if (name === "progress") {
    $("progress").value = data.step;
    text.textContent = `step ${data.step} / ${data.total} · ${data.elapsed.toFixed(1)} s · ETA ${data.eta.toFixed(1)} s`;
  } else if (name === "preview") {
    $("preview").src = data.url;
    $("preview").hidden = false;
  } else if (name === "image") {
    $("preview").hidden = true;
    addCard(data.url, data.seed, submitted.settings, submitted.size);
  } else if (name === "done") {
    text.textContent = `done in ${data.elapsed.toFixed(1)} s`;
  } else if (name === "cancelled") {
    text.textContent = `cancelled after step ${data.step}`;
  } else if (name === "error") {
    text.textContent = "";
    showError(data.message);
  }
}

// The chosen model's default steps and guidance as placeholders; its negative prompt only where it has one.
function showDefaults() {
  const model = models[$("model").value];
  $("steps").placeholder = model.default_steps;
  $("guidance").placeholder = model.default_guidance;
  $("negative-row").hidden = model.guidance_mode !== "cfg";
  $("guidance").disabled = model.guidance_mode === "none"; // guidance-distilled: the server ignores it
  if ($("negative-row").hidden) $("negative").value = "";
}

async function start() {
  $("preset").onchange = () => $("preset").value !== "custom" && setSize($("preset").value);
  for (const id of ["width", "height"]) $(id).oninput = () => ($("preset").value = "custom");
  $("random").onchange = () => ($("seed").disabled = $("random").checked);
  $("seed").disabled = true;
  $("form").onsubmit = generate;
  $("cancel").onclick = () => job && api(`/v1/jobs/${job}`, { method: "DELETE" });
  const drop = $("drop");
  drop.onclick = () => $("files").click();
  $("files").onchange = () => [...$("files").files].forEach((f) => addRef(f.name, f));
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    [...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")).forEach((f) => addRef(f.name, f));
  };
  try {
    for (const model of (await apiJson("/v1/models")).data) { // the loaded one first
      models[model.id] = model;
      $("model").append(new Option(model.id, model.id));
    }
    $("model").onchange = showDefaults;
    showDefaults();
    const jobs = (await apiJson("/v1/jobs")).data.reverse(); // oldest first: the newest ends on top
    for (const j of jobs) for (const im of j.images) addCard(im.url, im.seed, j.settings, j.size);
    const health = await (await fetch("/healthz")).json();
    $("status").textContent = health.status === "ok" ? "" : health.status;
  } catch (e) {
    showError(e.message);
  }
}

start();
