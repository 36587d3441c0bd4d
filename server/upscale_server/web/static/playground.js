// The Upscale Server playground: pick an image, send it through this server's Runware API
// (POST /v1: imageUpload, then an async imageUpscale polled with getResponse), and compare the
// result with its input at full resolution. Plain ES modules, no build step, nothing from the network.

const POLL_MS = 500;
const KEY_STORE = "upscale-playground.apiKey";
const PREFS_STORE = "upscale-playground.prefs";
const EXTENSIONS = { PNG: "png", JPG: "jpg", WEBP: "webp" };

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("controls"),
  dropZone: $("drop-zone"),
  file: $("file"),
  picked: $("picked"),
  pickedThumb: $("picked-thumb"),
  pickedName: $("picked-name"),
  model: $("model"),
  factor: $("factor"),
  format: $("format"),
  qualityField: $("quality-field"),
  quality: $("quality"),
  qualityValue: $("quality-value"),
  apiKey: $("api-key"),
  apiKeyHint: $("api-key-hint"),
  run: $("run"),
  progress: $("progress"),
  elapsed: $("elapsed"),
  status: $("status"),
  error: $("error"),
  result: $("result"),
  resultSize: $("result-size"),
  download: $("download"),
  slider: $("slider"),
  smooth: $("smooth"),
  fit: $("fit"),
  viewport: $("viewport"),
  compare: $("compare"),
  before: $("before"),
  after: $("after"),
  divider: $("divider"),
};

const state = { file: null, thumbUrl: null, running: false };

/** An error the page shows as is: the Runware error's message, with its code and parameter. */
class ApiError extends Error {
  constructor(message, code = "", parameter = "") {
    super(message);
    this.code = code;
    this.parameter = parameter;
  }
}

// ---------------------------------------------------------------- small helpers

function uuid4() {
  // crypto.randomUUID only exists in secure contexts (https or localhost); getRandomValues always does.
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function storageGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null; // storage disabled: nothing is remembered
  }
}

function storageSet(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    /* storage disabled or full */
  }
}

function readAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(`Could not read ${file.name}: ${reader.error?.message ?? "unknown error"}`));
    reader.readAsDataURL(file);
  });
}

function loadImage(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiError(`Could not load the image at ${src}`));
    img.src = src;
  });
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

// ---------------------------------------------------------------- the API

/** POST one task to /v1 and return its data item; Runware errors become ApiError with their message. */
async function callApi(task) {
  const headers = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch("v1", { method: "POST", headers, body: JSON.stringify([task]) });
  } catch (err) {
    throw new ApiError(`Could not reach the server: ${err.message}`, "network");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON: reported below with the HTTP status */
  }
  const errors = body && Array.isArray(body.errors) ? body.errors : [];
  if (errors.length > 0) {
    const first = errors[0];
    throw new ApiError(first.message || first.code || "The server reported an error.", first.code, first.parameter);
  }
  const data = body && Array.isArray(body.data) ? body.data : [];
  if (!response.ok || data.length === 0) {
    throw new ApiError(`Unexpected answer from the server (HTTP ${response.status}).`, `http${response.status}`);
  }
  return data[0];
}

// ---------------------------------------------------------------- status, progress, errors

let phaseStarted = 0;
let ticker = 0;

function setStatus(text) {
  ui.status.textContent = text;
}

function showError(err) {
  const where = err.parameter ? ` (${err.parameter})` : "";
  const code = err.code ? `${err.code}${where}: ` : "";
  ui.error.textContent = `${code}${err.message}`;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

function setRunning(running) {
  state.running = running;
  document.body.dataset.state = running ? "running" : document.body.dataset.state;
  ui.run.disabled = running || !state.file;
  ui.run.textContent = running ? "Running…" : "Run";
  ui.progress.hidden = !running;
  ui.form.setAttribute("aria-busy", String(running));
  clearInterval(ticker);
  if (running) {
    phaseStarted = performance.now();
    ui.elapsed.textContent = "0.0 s";
    ticker = setInterval(() => {
      ui.elapsed.textContent = `${((performance.now() - phaseStarted) / 1000).toFixed(1)} s`;
    }, 100);
  }
}

// ---------------------------------------------------------------- picking a file

function setFile(file) {
  clearError();
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(new ApiError(`${file.name} is not an image.`));
    return;
  }
  state.file = file;
  if (state.thumbUrl) URL.revokeObjectURL(state.thumbUrl);
  state.thumbUrl = URL.createObjectURL(file);
  ui.pickedThumb.onload = () => {
    const { naturalWidth: w, naturalHeight: h } = ui.pickedThumb;
    ui.pickedName.textContent = `${file.name} · ${w} × ${h} px · ${formatBytes(file.size)}`;
  };
  ui.pickedThumb.src = state.thumbUrl;
  ui.pickedName.textContent = `${file.name} · ${formatBytes(file.size)}`;
  ui.picked.hidden = false;
  ui.run.disabled = state.running;
  setStatus("Ready: press Run.");
}

ui.file.addEventListener("change", () => setFile(ui.file.files[0]));

// Drop anywhere on the page; the drop zone lights up. Without this, a missed drop would navigate away.
let dragDepth = 0;
window.addEventListener("dragenter", (event) => {
  event.preventDefault();
  dragDepth += 1;
  ui.dropZone.classList.add("dragging");
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) ui.dropZone.classList.remove("dragging");
});
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  ui.dropZone.classList.remove("dragging");
  const file = event.dataTransfer?.files?.[0];
  if (file) setFile(file);
});
// Pasting an image (Ctrl+V) works too.
window.addEventListener("paste", (event) => {
  const file = Array.from(event.clipboardData?.files ?? []).find((f) => f.type.startsWith("image/"));
  if (file) setFile(file);
});

// ---------------------------------------------------------------- options

function updateQualityField() {
  ui.qualityField.hidden = ui.format.value === "PNG";
  ui.qualityValue.textContent = ui.quality.value;
}

function savePrefs() {
  const prefs = { model: ui.model.value, factor: ui.factor.value, format: ui.format.value, quality: ui.quality.value };
  storageSet(PREFS_STORE, JSON.stringify(prefs));
}

function restorePrefs() {
  let prefs = {};
  try {
    prefs = JSON.parse(storageGet(PREFS_STORE) ?? "{}") ?? {};
  } catch {
    prefs = {};
  }
  for (const name of ["factor", "format"]) {
    const known = Array.from(ui[name].options, (option) => option.value);
    if (known.includes(prefs[name])) ui[name].value = prefs[name];
  }
  if (typeof prefs.quality === "string") ui.quality.value = prefs.quality; // a range clamps what it is given
  return prefs;
}

async function loadModels(preferred) {
  try {
    const response = await fetch("playground/models", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    for (const model of info.models) {
      // A restoration model (native 1x) serves no upscale factor: listed as such, not selectable.
      const restoration = model.factors && model.factors.length === 0;
      const label = `${model.name} (${model.id})${restoration ? " - restoration (1x), does not upscale" : ""}`;
      const option = new Option(label, model.id);
      option.title = model.description;
      option.disabled = restoration;
      ui.model.add(option);
    }
    const usable = info.models.filter((m) => !m.factors || m.factors.length > 0);
    const wanted = [preferred, info.default].find((id) => id && usable.some((m) => m.id === id));
    if (wanted) ui.model.value = wanted;
    if (info.keysRequired) {
      ui.apiKey.placeholder = "required by this server";
      ui.apiKey.required = true;
    }
  } catch (err) {
    setStatus(`Could not list the models (${err.message}); the server's default model will be used.`);
  }
  ui.model.dataset.loaded = "true";
}

ui.format.addEventListener("change", updateQualityField);
ui.quality.addEventListener("input", updateQualityField);
for (const control of [ui.model, ui.factor, ui.format, ui.quality]) control.addEventListener("change", savePrefs);
ui.apiKey.addEventListener("change", () => storageSet(KEY_STORE, ui.apiKey.value.trim()));

// ---------------------------------------------------------------- running a task

async function pollResult(taskUUID) {
  for (;;) {
    await sleep(POLL_MS);
    const item = await callApi({ taskType: "getResponse", taskUUID });
    if (item.status === "success" || item.imageURL) return item;
    setStatus(`Upscaling… (status: ${item.status ?? "processing"})`);
  }
}

async function run(event) {
  event.preventDefault();
  if (!state.file || state.running) return;
  storageSet(KEY_STORE, ui.apiKey.value.trim());
  savePrefs();
  clearError();
  setRunning(true);
  const file = state.file;
  const format = ui.format.value;
  const factor = Number(ui.factor.value);
  try {
    setStatus("Reading the file…");
    const image = await readAsDataUri(file);
    setStatus("Uploading…");
    const upload = await callApi({ taskType: "imageUpload", taskUUID: uuid4(), image });

    const task = {
      taskType: "imageUpscale",
      taskUUID: uuid4(),
      inputImage: upload.imageUUID,
      upscaleFactor: factor,
      outputFormat: format,
      outputType: "URL",
      deliveryMethod: "async",
    };
    if (ui.model.value) task.model = ui.model.value;
    if (format !== "PNG") task.outputQuality = Number(ui.quality.value);
    setStatus("Queued…");
    await callApi(task); // the acknowledgement; the result comes from getResponse
    const result = await pollResult(task.taskUUID);

    setStatus("Loading the result…");
    await showResult({ upload, result, file, format, factor });
    const seconds = ((performance.now() - phaseStarted) / 1000).toFixed(1);
    setStatus(`Done in ${seconds} s: ${ui.after.naturalWidth} × ${ui.after.naturalHeight} px ${format}.`);
    document.body.dataset.state = "done";
  } catch (err) {
    showError(err instanceof ApiError ? err : new ApiError(String(err?.message ?? err)));
    setStatus("Failed.");
    document.body.dataset.state = "error";
  } finally {
    setRunning(false);
  }
}

ui.form.addEventListener("submit", run);

// ---------------------------------------------------------------- the comparison

async function showResult({ upload, result, file, format, factor }) {
  await Promise.all([loadImage(ui.before, upload.imageURL), loadImage(ui.after, result.imageURL)]);
  const width = ui.after.naturalWidth;
  const height = ui.after.naturalHeight;
  ui.compare.style.width = `${width}px`;
  ui.compare.style.height = `${height}px`;
  ui.compare.style.aspectRatio = `${width} / ${height}`;
  const input = `${ui.before.naturalWidth} × ${ui.before.naturalHeight}`;
  ui.resultSize.textContent = `${width} × ${height} px (input ${input} px, ${factor}×, ${format})`;

  const stem = file.name.replace(/\.[^.]+$/, "") || "image";
  ui.download.href = result.imageURL;
  ui.download.download = `${stem}_x${factor}.${EXTENSIONS[format] ?? format.toLowerCase()}`;
  ui.result.hidden = false;
  setSlider(Number(ui.slider.value));
  ui.result.scrollIntoView({ block: "nearest" });
}

function setSlider(percent) {
  const clamped = Math.min(100, Math.max(0, percent));
  ui.compare.style.setProperty("--pos", `${clamped}%`);
  ui.slider.value = String(clamped);
  ui.slider.setAttribute("aria-valuetext", `${Math.round(clamped)}% before, ${Math.round(100 - clamped)}% after`);
}

ui.slider.addEventListener("input", () => setSlider(Number(ui.slider.value)));
ui.smooth.addEventListener("change", () => ui.compare.classList.toggle("smooth", ui.smooth.checked));
ui.fit.addEventListener("change", () => ui.viewport.classList.toggle("fit", ui.fit.checked));

// Drag the divider (mouse, pen or touch), or click anywhere on the images with a mouse to move it there.
function sliderFromPointer(event) {
  const rect = ui.compare.getBoundingClientRect();
  if (rect.width > 0) setSlider(((event.clientX - rect.left) / rect.width) * 100);
}
let dragging = false;
ui.compare.addEventListener("pointerdown", (event) => {
  if (event.pointerType !== "mouse" && event.target !== ui.divider) return; // touch elsewhere scrolls
  if (event.button !== 0) return;
  dragging = true;
  ui.compare.setPointerCapture(event.pointerId);
  sliderFromPointer(event);
  event.preventDefault();
});
ui.compare.addEventListener("pointermove", (event) => {
  if (dragging) sliderFromPointer(event);
});
for (const type of ["pointerup", "pointercancel"]) {
  ui.compare.addEventListener(type, () => {
    dragging = false;
  });
}

// ---------------------------------------------------------------- start

ui.apiKey.value = storageGet(KEY_STORE) ?? "";
const prefs = restorePrefs();
updateQualityField();
setSlider(Number(ui.slider.value));
document.body.dataset.state = "idle";
loadModels(prefs.model);
