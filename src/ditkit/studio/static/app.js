// ditkit studio page: settings -> POST /api/jobs -> poll /api/jobs/ID -> preview, grid, downloads.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { info: null, mode: "sample", slots: {}, source: null, mask: null, polling: new Set() };

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? data.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return data;
}

// ----- settings panels ---------------------------------------------------------------------

function makeSettings(slot) {
  const info = state.info;
  const node = $("#settings-template").content.firstElementChild.cloneNode(true);
  node.id = `settings-${slot}`;
  $("legend", node).textContent = `Settings ${slot}`;
  for (const input of node.querySelectorAll("[data-key]")) input.id = `${slot}-${input.dataset.key}`;
  const sampler = $("[data-key=sampler]", node);
  for (const name of info.samplers) sampler.add(new Option(name, name));
  const d = info.defaults;
  sampler.value = d.sampler;
  $("[data-key=steps]", node).value = d.steps;
  $("[data-key=steps]", node).max = info.limits.max_steps;
  $("[data-key=cfg_scale]", node).value = d.cfg_scale;
  $("[data-key=cfg_scale]", node).max = info.limits.max_cfg;
  $("[data-key=seed]", node).value = slot === "B" ? d.seed + 1 : d.seed;
  $("[data-key=eta]", node).value = d.eta;
  $("[data-key=batch]", node).max = info.limits.max_batch;
  if (info.conditioning === "class") {
    const n = Math.min(info.num_classes, 8);
    $("[data-key=labels]", node).value = Array.from({ length: n }, (_, k) => k).join(", ");
  }
  const refresh = () => {
    for (const el of node.querySelectorAll("[data-for]")) {
      const need = el.dataset.for;
      let show = need === info.conditioning;
      if (need === "guidance") show = info.guidance;
      if (need === "ddim") show = sampler.value === "ddim";
      el.hidden = !show;
    }
  };
  sampler.addEventListener("change", refresh);
  refresh();
  return node;
}

function parseLabels(text, repeat) {
  const parts = text.split(/[\s,]+/).filter((p) => p.length);
  const labels = parts.map((p) => (/^-?\d+$/.test(p) ? Number(p) : p));  // the server names bad ones
  const out = [];
  for (const label of labels) for (let k = 0; k < repeat; k++) out.push(label);
  return out;
}

function readSettings(slot) {
  const node = $(`#settings-${slot}`);
  const get = (key) => $(`[data-key=${key}]`, node);
  const num = (key) => (get(key).value === "" ? null : Number(get(key).value));
  const body = {
    sampler: get("sampler").value,
    steps: num("steps"),
    seed: num("seed"),
    preview: get("preview").checked,
  };
  if (state.info.guidance) body.cfg_scale = num("cfg_scale");
  if (body.sampler === "ddim") body.eta = num("eta");
  if (state.info.conditioning === "class") {
    const repeat = Math.max(1, num("repeat") || 1);
    body.labels = parseLabels(get("labels").value, repeat);
    body.nrow = repeat > 1 ? repeat : Math.min(body.labels.length, 10) || 1;
  } else if (state.info.conditioning === "text") {
    body.prompts = get("prompts").value.split("\n").filter((p) => p.trim());
  } else {
    body.batch = num("batch");
  }
  return body;
}

function summary(body) {
  const parts = [`${body.sampler}, ${body.steps} steps`, `seed ${body.seed}`];
  if (body.cfg_scale !== undefined) parts.push(`cfg ${body.cfg_scale}`);
  if (body.eta !== undefined) parts.push(`eta ${body.eta}`);
  if (body.labels) parts.push(`labels ${body.labels.join(",")}`);
  if (body.prompts) parts.push(`prompts: ${body.prompts.join(" | ")}`);
  if (body.batch) parts.push(`${body.batch} images`);
  if (body.kind !== "sample") parts.push(body.kind + (body.direction ? ` ${body.direction} x${body.times}` : ""));
  return parts.join(" · ");
}

// ----- source image and mask editor (inpaint / outpaint) ------------------------------------

function setSource(img) {
  const w = img.naturalWidth || img.width, h = img.naturalHeight || img.height;
  const source = document.createElement("canvas");
  source.width = w; source.height = h;
  const ctx = source.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 0, 0);
  const mask = document.createElement("canvas");
  mask.width = w; mask.height = h;
  const m = mask.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, w, h);
  state.source = source; state.mask = mask;
  const editor = $("#editor");
  editor.width = w; editor.height = h;
  editor.style.width = `${Math.min(480, Math.max(240, w * 8))}px`;
  $("#editor-hint").textContent = `${w}x${h} px source. Paint (drag) the region to fill.`;
  drawEditor();
}

function drawEditor() {
  const editor = $("#editor"), ctx = editor.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, editor.width, editor.height);
  if (!state.source) return;
  ctx.drawImage(state.source, 0, 0);
  if (state.mode !== "inpaint") return;
  const mask = state.mask.getContext("2d").getImageData(0, 0, editor.width, editor.height);
  const over = ctx.getImageData(0, 0, editor.width, editor.height);
  for (let i = 0; i < mask.data.length; i += 4) {
    if (mask.data[i] > 127) {  // painted: tint red
      over.data[i] = Math.round(over.data[i] * 0.4 + 255 * 0.6);
      over.data[i + 1] = Math.round(over.data[i + 1] * 0.4);
      over.data[i + 2] = Math.round(over.data[i + 2] * 0.4);
    }
  }
  ctx.putImageData(over, 0, 0);
}

function paintAt(event) {
  if (!state.mask || state.mode !== "inpaint") return;
  const editor = $("#editor"), rect = editor.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * editor.width;
  const y = ((event.clientY - rect.top) / rect.height) * editor.height;
  const ctx = state.mask.getContext("2d");
  ctx.fillStyle = $("#erase").checked ? "#000" : "#fff";
  ctx.beginPath();
  ctx.arc(x, y, Number($("#brush").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
  drawEditor();
}

function maskPreset(which) {
  if (!state.mask) return showError("load a source image first");
  const ctx = state.mask.getContext("2d"), w = state.mask.width, h = state.mask.height;
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h);
  ctx.fillStyle = "#fff";
  if (which === "left") ctx.fillRect(0, 0, Math.ceil(w / 2), h);
  if (which === "right") ctx.fillRect(Math.floor(w / 2), 0, w, h);
  if (which === "center") ctx.fillRect(Math.floor(w / 4), Math.floor(h / 4), Math.ceil(w / 2), Math.ceil(h / 2));
  drawEditor();
}

function loadImageURL(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not read that image"));
    img.src = url;
  });
}

async function editResult(url) {
  setSource(await loadImageURL(url));
  if (state.mode === "sample") setMode("inpaint");
  window.scrollTo(0, 0);
}

// ----- jobs ---------------------------------------------------------------------------------

function resultPanel(slot) {
  let node = $(`#result-${slot}`);
  if (!node) {
    node = $("#result-template").content.firstElementChild.cloneNode(true);
    node.id = `result-${slot}`;
    $("#results").append(node);
  }
  return node;
}

function renderStatus(node, s) {
  const bar = $("progress", node), text = $(".status", node);
  bar.value = s.progress;
  let line = s.status;
  if (s.status === "queued") line = `queued (${s.position} ahead)`;
  if (s.status === "running") {
    line = s.num_steps ? `step ${s.step} of ${s.num_steps}` : "starting…";
    if (s.rounds > 1) line += `, round ${s.round + 1} of ${s.rounds}`;
  }
  if (s.status === "done") line = `done in ${s.seconds}s: ${s.images} image${s.images === 1 ? "" : "s"}`;
  if (s.status === "error") line = `error: ${s.error}`;
  if (s.status === "cancelled") line = s.step ? `cancelled at step ${s.step} of ${s.num_steps}` : "cancelled";
  text.textContent = line;
  text.dataset.status = s.status;
  const cancel = $("button.cancel", node);
  cancel.hidden = !(s.status === "queued" || s.status === "running");
  cancel.onclick = () => {
    cancel.disabled = true;
    const stop = api(`/api/jobs/${s.id}/cancel`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    // a job that finished in the meantime answers 409: its final status arrives with the next poll
    stop.catch((err) => { if (!/already finished/.test(err.message)) showError(err.message); })
      .finally(() => { cancel.disabled = false; });
  };
  const preview = $("img.preview", node);
  if (s.has_preview && s.status === "running") {
    preview.src = `/api/jobs/${s.id}/preview.png?step=${s.step}-${s.round}`;
    preview.hidden = false;
  }
  if (s.status === "done") {
    preview.hidden = true;
    const grid = $("img.grid", node);
    grid.src = s.grid_url;
    grid.hidden = false;
    const links = $(".downloads", node);
    links.textContent = "";
    const all = document.createElement("a");
    all.href = s.grid_url; all.download = `ditkit_job${s.id}_grid.png`; all.textContent = "download grid";
    links.append(all);
    s.image_urls.forEach((url, k) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = url; img.alt = `image ${k}`;
      const a = document.createElement("a");
      a.href = url; a.download = `ditkit_job${s.id}_${k}.png`; a.textContent = `#${k}`;
      const edit = document.createElement("button");
      edit.className = "small"; edit.textContent = "edit";
      edit.title = "use as the source image for inpainting / outpainting";
      edit.addEventListener("click", () => editResult(url).catch((err) => showError(err.message)));
      fig.append(img, a, edit);
      links.append(fig);
    });
  }
  if (s.status === "error") showError(s.error);
}

async function poll(slot, id) {
  const node = resultPanel(slot);
  state.polling.add(slot);
  try {
    for (;;) {
      const s = await api(`/api/jobs/${id}`);
      renderStatus(node, s);
      if (s.status === "done" || s.status === "error" || s.status === "cancelled") break;
      await new Promise((r) => setTimeout(r, 150));
    }
  } catch (err) {
    showError(err.message);
  } finally {
    state.polling.delete(slot);
    if (!state.polling.size) $("#run").disabled = false;
  }
}

function jobBody(slot) {
  const body = readSettings(slot);
  body.kind = state.mode;
  if (state.mode !== "sample") {
    if (!state.source) throw new Error("load a source image first (upload one, or press “edit” under a result)");
    body.image = state.source.toDataURL("image/png");
    body.method = $("#method").value;
    body.resample = Number($("#resample").value);
    body.jump = Number($("#jump").value);
  }
  if (state.mode === "inpaint") body.mask = state.mask.toDataURL("image/png");
  if (state.mode === "outpaint") {
    body.direction = $("#direction").value;
    body.times = Number($("#times").value);
    body.overlap = Number($("#overlap").value);
  }
  return body;
}

async function run() {
  showError("");
  const slots = $("#compare").checked ? ["A", "B"] : ["A"];
  if (slots.length === 1 && $("#result-B")) $("#result-B").remove();
  let bodies;
  try {
    bodies = slots.map((slot) => [slot, jobBody(slot)]);
  } catch (err) {
    return showError(err.message);
  }
  $("#run").disabled = true;
  for (const [slot, body] of bodies) {  // clear old results at once, before any request is answered
    const node = resultPanel(slot);
    $("h2", node).textContent = slots.length > 1 ? `Settings ${slot}` : "Result";
    $(".settings-summary", node).textContent = summary(body);
    $(".status", node).textContent = "submitting…";
    $(".status", node).dataset.status = "submitting";
    $("progress", node).value = 0;
    $("img.grid", node).hidden = true;
    $("img.preview", node).hidden = true;
    $(".downloads", node).textContent = "";
    $("button.cancel", node).hidden = true;
  }
  let started = 0;
  for (const [slot, body] of bodies) {
    const node = resultPanel(slot);
    try {
      const job = await api("/api/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      $(".status", node).textContent = `queued (${job.position} ahead)`;
      $(".status", node).dataset.status = "queued";
      started++;
      poll(slot, job.id);
    } catch (err) {
      $(".status", node).textContent = `error: ${err.message}`;
      $(".status", node).dataset.status = "error";
      showError(err.message);
    }
  }
  if (!started) $("#run").disabled = false;
}

// ----- modes and start-up -------------------------------------------------------------------

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("nav button")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  $("#source").hidden = mode === "sample";
  $("#mask-tools").hidden = mode !== "inpaint";
  $("#outpaint-tools").hidden = mode !== "outpaint";
  $("#run").textContent = { sample: "Generate", inpaint: "Inpaint", outpaint: "Outpaint" }[mode];
  drawEditor();
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    return showError(`could not load model info: ${err.message}`);
  }
  const info = state.info;
  const what = { class: `${info.num_classes} classes`, text: "text prompts", none: "unconditional" }[info.conditioning];
  $("#model-info").textContent =
    `${info.checkpoint} · ${info.width}x${info.height}x${info.channels}` +
    (info.latent ? ` (latents ${info.latent[2]}x${info.latent[1]}x${info.latent[0]})` : "") +
    ` · ${what}` + (info.inpaint_model ? " · inpainting model" : "");
  $("#settings").append(makeSettings("A"), makeSettings("B"));
  $("#settings-B").hidden = true;
  $("#compare").addEventListener("change", (e) => { $("#settings-B").hidden = !e.target.checked; });
  for (const name of info.directions) $("#direction").add(new Option(name, name));
  $("#resample").max = info.limits.max_resample;
  $("#times").max = info.limits.max_times;
  if (info.inpaint_model) $("#method").value = "trained";
  for (const tab of document.querySelectorAll("nav button")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("#run").addEventListener("click", run);
  $("#file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const url = URL.createObjectURL(file);
    try { setSource(await loadImageURL(url)); showError(""); } catch (err) { showError(err.message); }
  });
  const editor = $("#editor");
  let drawing = false;
  editor.addEventListener("pointerdown", (e) => { drawing = true; editor.setPointerCapture(e.pointerId); paintAt(e); });
  editor.addEventListener("pointermove", (e) => { if (drawing) paintAt(e); });
  editor.addEventListener("pointerup", () => { drawing = false; });
  $("#mask-left").addEventListener("click", () => maskPreset("left"));
  $("#mask-right").addEventListener("click", () => maskPreset("right"));
  $("#mask-center").addEventListener("click", () => maskPreset("center"));
  $("#mask-clear").addEventListener("click", () => maskPreset("clear"));
  document.body.dataset.ready = "true";
}

start();
