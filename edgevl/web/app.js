// edgevl web page: pick a picture, ask, watch the answer stream. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  image: null,        // {dataUrl, width, height, name}
  video: null,        // {dataUrl, name, duration, width, height}; width 0 if the browser cannot play it
  imageSent: false,   // the current image or clip is already part of the conversation
  history: [],        // OpenAI-format messages
  controller: null,   // AbortController of the running request
  health: null,
};

const PRESETS = {
  describe: "Describe this picture in detail.",
  chart: "Explain the trend shown in this chart: what rises or falls, by how much, and where it peaks.",
};

// ---- Qwen's smart_resize, as in edgevl/preprocess/image.py: what the vision encoder will see
function smartResize(h, w, maxPixels, factor = 32, minPixels = 65536) {
  if (Math.max(h, w) / Math.min(h, w) > 200) return null;
  let hb = Math.round(h / factor) * factor, wb = Math.round(w / factor) * factor;
  if (hb * wb > maxPixels) {
    const beta = Math.sqrt((h * w) / maxPixels);
    hb = Math.max(factor, Math.floor(h / beta / factor) * factor);
    wb = Math.max(factor, Math.floor(w / beta / factor) * factor);
  } else if (hb * wb < minPixels) {
    const beta = Math.sqrt(minPixels / (h * w));
    hb = Math.ceil((h * beta) / factor) * factor;
    wb = Math.ceil((w * beta) / factor) * factor;
  }
  return [hb, wb];
}

// ---- a clip's cost, as edgevl/preprocess/video.py and video_patches.py will compute it: frames
// sampled at 2 per second (at least 4), one resize for the clip within the server's pixel budget
function videoPlan(v) {
  const h = state.health || {};
  const frames = Math.max(4, Math.min(Math.floor(v.duration * 2), h.max_video_frames || 64));
  const budget = h.max_video_pixels || 2097152, factor = 32, minPixels = 4096;
  let hb = Math.round(v.height / factor) * factor, wb = Math.round(v.width / factor) * factor;
  const tb = Math.round(frames / 2) * 2;
  if (tb * hb * wb > budget) {
    const beta = Math.sqrt((frames * v.height * v.width) / budget);
    hb = Math.max(factor, Math.floor(v.height / beta / factor) * factor);
    wb = Math.max(factor, Math.floor(v.width / beta / factor) * factor);
  } else if (tb * hb * wb < minPixels) {
    const beta = Math.sqrt(minPixels / (frames * v.height * v.width));
    hb = Math.ceil((v.height * beta) / factor) * factor;
    wb = Math.ceil((v.width * beta) / factor) * factor;
  }
  return { frames, height: hb, width: wb, tokens: Math.ceil(frames / 2) * (hb / factor) * (wb / factor) };
}

// ---- API key, when the server asks for one (kept in this browser only)
function authHeaders() {
  const key = localStorage.getItem("edgevl-api-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey() {
  const key = window.prompt("This server needs an API key:");
  if (key) localStorage.setItem("edgevl-api-key", key.trim());
}

// ---- health and model info
async function refreshHealth() {
  const el = $("health");
  try {
    const r = await fetch("/api/health", { cache: "no-store" });
    const h = await r.json();
    state.health = h;
    if (h.status !== "ok") {
      el.className = "health busy"; $("health-text").textContent = h.status;
      return;
    }
    el.className = "health " + (h.in_flight > 0 || h.queue_depth > 0 ? "busy" : "ok");
    $("health-text").textContent = h.in_flight > 0 ? `busy (${h.queue_depth} waiting)` : "ready";
    $("model-info").textContent = `${h.model} · ${h.backend} · ${h.precision} · ${h.threads} threads` +
      (h.thinking ? " · thinks before answering" : "");
    $("random-banner").hidden = !h.random_weights;
    $("reasoning-budget-row").hidden = !h.thinking;
  } catch {
    el.className = "health down"; $("health-text").textContent = "offline";
  }
}

// ---- image input: file dialog, camera, drag-and-drop, paste
function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = !msg;
}

function loadFile(file) {
  showError("");
  if (!file) return;
  if (file.type && file.type.startsWith("video/")) { loadVideo(file); return; }
  if (file.type && !file.type.startsWith("image/")) {
    showError(`"${file.name}" is neither an image nor a clip. Choose a PNG, JPEG, WebP, GIF, BMP, MP4, WebM or MOV file.`);
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => showError(`Could not read "${file.name}".`);
  reader.onload = () => {
    const img = new Image();
    img.onload = () => setImage({ dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight,
                                  name: file.name });
    img.onerror = () => showError(`"${file.name}" is not an image this page can read.`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function loadVideo(file) {
  const reader = new FileReader();
  reader.onerror = () => showError(`Could not read "${file.name}".`);
  reader.onload = () => {
    const v = document.createElement("video");
    v.preload = "metadata";
    // a clip this browser cannot play is still sent: the server decodes it, and says what it cost
    v.onloadedmetadata = () => setVideo({ dataUrl: reader.result, name: file.name, duration: v.duration,
                                          width: v.videoWidth, height: v.videoHeight });
    v.onerror = () => setVideo({ dataUrl: reader.result, name: file.name, duration: 0, width: 0, height: 0 });
    v.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function setVideo(video) {
  setImage(null);
  state.video = video;
  const p = $("video-preview");
  p.hidden = !video; $("drop-empty").hidden = !!video; $("clear-image").hidden = !video;
  if (video) { p.src = video.dataUrl; p.setAttribute("aria-label", `Selected clip ${video.name}`); }
  updateSizeNote();
}

function drawBoxes(boxes, size) {
  const layer = $("boxes");
  layer.innerHTML = "";
  for (const b of boxes || []) {
    const [x1, y1, x2, y2] = b.box_upright;  // the browser shows the EXIF-upright picture
    const d = document.createElement("div");
    d.className = "box";
    Object.assign(d.style, { left: `${(x1 / size.width) * 100}%`, top: `${(y1 / size.height) * 100}%`,
                             width: `${((x2 - x1) / size.width) * 100}%`, height: `${((y2 - y1) / size.height) * 100}%` });
    const label = document.createElement("span");
    label.textContent = b.label || "?";
    d.append(label);
    layer.append(d);
  }
}

function setImage(img) {
  drawBoxes([]);
  state.image = img;
  state.imageSent = false;
  if (img && state.video) { state.video = null; $("video-preview").hidden = true; $("video-preview").removeAttribute("src"); }
  const p = $("preview");
  p.hidden = !img; $("drop-empty").hidden = !!img || !!state.video; $("clear-image").hidden = !img && !state.video;
  if (img) { p.src = img.dataUrl; p.alt = `Selected picture ${img.name}`; }
  updateSizeNote();
}

function updateSizeNote() {
  const img = state.image, v = state.video;
  if (v) {
    if (!v.width) { $("image-size").textContent = `${v.name}: the frames and their token cost show after sending`; return; }
    const plan = videoPlan(v);
    $("image-size").textContent = `${v.width} × ${v.height} px, ${v.duration.toFixed(1)} s → ${plan.frames} frames ` +
      `sampled, resized to ${plan.width} × ${plan.height} (≈ ${plan.tokens} video tokens)`;
    return;
  }
  if (!img) { $("image-size").textContent = ""; return; }
  const budget = Number($("max-pixels").value);
  const r = smartResize(img.height, img.width, budget);
  $("image-size").textContent = r
    ? `${img.width} × ${img.height} px → resized to ${r[1]} × ${r[0]} (${(r[0] / 32) * (r[1] / 32)} image tokens)`
    : `${img.width} × ${img.height} px: too elongated (aspect ratio over 200:1)`;
}

// ---- conversation rendering
function addMessage(role, text, thumb) {
  const box = $("messages");
  box.querySelector(".empty-chat")?.remove();
  const m = document.createElement("div");
  m.className = `msg ${role}`;
  if (thumb) { const t = document.createElement("img"); t.className = "thumb"; t.src = thumb; t.alt = "attached picture"; m.append(t); }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  m.append(body);
  box.append(m);
  box.scrollTop = box.scrollHeight;
  return m;
}

function showStats(msgEl, timings, usage, note) {
  const s = document.createElement("div");
  s.className = "stats";
  const parts = [];
  if (note) parts.push(note);
  if (timings) {
    parts.push(`first token ${Math.round(timings.ttft_ms)} ms`, `total ${(timings.total_ms / 1000).toFixed(2)} s`,
               `${timings.tokens_per_s.toFixed(1)} tokens/s`);
  }
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  const thinking = usage && ((usage.completion_tokens_details && usage.completion_tokens_details.reasoning_tokens) ||
                             usage.reasoning_tokens);
  if (thinking) parts.push(`${thinking} of them thinking`);
  const videoTokens = usage && usage.prompt_tokens_details && usage.prompt_tokens_details.video_tokens;
  if (videoTokens) parts.push(`clip: ${videoTokens} video tokens`);
  for (const p of parts) { const sp = document.createElement("span"); sp.textContent = p; s.append(sp); }
  msgEl.append(s);
}

function friendlyError(status, err) {
  const msg = (err && err.message) || `request failed (${status})`;
  if (status === 429) return `The server is busy: ${msg}. Try again in a moment.`;
  if (status === 401) return "This server needs an API key. Enter it when asked, then send again.";
  if (status === 413) return `The image, clip or request is too large: ${msg}`;
  if (status === 503) return `The server cannot take work right now: ${msg}`;
  if (status === 504) return `The answer took too long: ${msg}`;
  return msg.charAt(0).toUpperCase() + msg.slice(1);
}

// a thinking model's thought: folded away above the answer, open it to read along
function thoughtBox(msgEl) {
  let box = msgEl.querySelector("details.thinking");
  if (!box) {
    box = document.createElement("details");
    box.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const thought = document.createElement("div");
    thought.className = "thought";
    box.append(summary, thought);
    msgEl.insertBefore(box, msgEl.querySelector(".text"));
  }
  return box;
}

function setBusy(busy) {
  $("send").disabled = busy; $("stop").disabled = !busy;
  for (const b of document.querySelectorAll("[data-preset]")) b.disabled = busy;
}

// ---- streaming: SSE from /v1/chat/completions, NDJSON from /api/ocr
async function* readLines(response, separator) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf(separator)) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + separator.length);
      if (line) yield line;
    }
  }
  if (buf.trim()) yield buf.trim();
}

async function run(url, body, userText, parse) {
  showError("");
  const thumb = body.__thumb; delete body.__thumb;
  addMessage("user", userText, thumb);
  const msgEl = addMessage("assistant", "");
  msgEl.classList.add("streaming");
  const textEl = msgEl.querySelector(".text");
  state.controller = new AbortController();
  setBusy(true);
  let answer = "", thought = "", timings = null, usage = null, note = null;
  try {
    const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
                                 body: JSON.stringify(body), signal: state.controller.signal });
    if (r.status === 401) askForKey();
    if (!r.ok) {
      let err = null;
      try { err = (await r.json()).error; } catch { /* not JSON */ }
      throw Object.assign(new Error(friendlyError(r.status, err)), { shown: true });
    }
    for await (const ev of parse(r)) {
      if (ev.error) throw Object.assign(new Error(friendlyError(0, ev.error)), { shown: true });
      if (ev.reasoning) {
        thought += ev.reasoning;
        thoughtBox(msgEl).querySelector(".thought").textContent = thought;
      }
      if (ev.text) { answer += ev.text; textEl.textContent = answer; $("messages").scrollTop = 1e9; }
      if (ev.timings) timings = ev.timings;
      if (ev.usage) usage = ev.usage;
    }
  } catch (e) {
    if (e.name === "AbortError") note = "stopped";
    else { showError(e.shown ? e.message : `Connection problem: ${e.message}`); note = "failed"; }
  } finally {
    msgEl.classList.remove("streaming");
    if (thought) thoughtBox(msgEl).querySelector("summary").textContent = "Thought";
    if (!answer && note) textEl.textContent = note === "stopped" ? "(stopped)" : "(no answer)";
    showStats(msgEl, timings, usage, note);
    state.controller = null;
    setBusy(false);
    $("question").focus();
  }
  return answer;
}

async function* parseSSE(r) {
  for await (const line of readLines(r, "\n\n")) {
    if (!line.startsWith("data: ")) continue;
    const data = line.slice(6);
    if (data === "[DONE]") return;
    const obj = JSON.parse(data);
    if (obj.error) { yield { error: obj.error }; return; }
    const c = obj.choices && obj.choices[0];
    yield { text: c && c.delta && c.delta.content, reasoning: c && c.delta && c.delta.reasoning_content,
            timings: obj.timings, usage: obj.usage };
  }
}

async function* parseNDJSON(r) {
  for await (const line of readLines(r, "\n")) {
    const obj = JSON.parse(line);
    if (obj.error) { yield { error: obj.error }; return; }
    yield { text: obj.token, reasoning: obj.reasoning, timings: obj.timings, usage: obj.usage };
  }
}

function responseFormat() {
  if (!$("json-mode").checked) return undefined;
  const text = $("json-schema").value.trim();
  if (!text) return { type: "json_object" };
  let schema;
  try { schema = JSON.parse(text); } catch (e) { throw new Error(`The JSON schema does not parse: ${e.message}`); }
  return { type: "json_schema", json_schema: { name: "answer", schema } };
}

function options() {
  const t = $("temperature").value;
  const o = { max_tokens: Number($("max-tokens").value) || 256, max_pixels: Number($("max-pixels").value) };
  if (t !== "") o.temperature = Number(t);  // empty: the model's own (generation_config.json)
  const budget = $("reasoning-budget").value;
  if (budget !== "" && state.health && state.health.thinking) o.reasoning_budget = Number(budget);  // empty: the server's
  return o;
}

async function ask(question) {
  if (!question.trim() || state.controller) return;
  const content = [];
  let thumb = null;
  let shown = question;
  if (state.image && !state.imageSent) {
    content.push({ type: "image_url", image_url: { url: state.image.dataUrl } });
    thumb = state.image.dataUrl;
  }
  if (state.video && !state.imageSent) {
    content.push({ type: "video_url", video_url: { url: state.video.dataUrl } });
    shown = `(clip: ${state.video.name}) ${question}`;
  }
  content.push({ type: "text", text: question });
  const userMsg = { role: "user", content };
  let response_format;
  try { response_format = responseFormat(); } catch (e) { showError(e.message); return; }
  const body = { messages: [...state.history, userMsg], stream: true, stream_options: { include_usage: true },
                 ...options(), response_format, __thumb: thumb };
  const answer = await run("/v1/chat/completions", body, shown, parseSSE);
  if (answer) {
    state.history.push(userMsg, { role: "assistant", content: answer });
    if (thumb || shown !== question) state.imageSent = true;
  }
}

async function ocr() {
  if (!state.image) { showError("Choose a picture first: text extraction reads the text in an image."); return; }
  if (state.controller) return;
  const { max_tokens, max_pixels } = options();
  const body = { image: state.image.dataUrl, stream: true, max_tokens, max_pixels, __thumb: state.image.dataUrl };
  const answer = await run("/api/ocr", body, "Extract all text", parseNDJSON);
  if (answer) {
    state.history.push({ role: "user", content: [{ type: "image_url", image_url: { url: state.image.dataUrl } },
                                                 { type: "text", text: "Extract all the text in this image." }] },
                       { role: "assistant", content: answer });
    state.imageSent = true;
  }
}

async function find() {
  const query = $("question").value.trim();
  if (!state.image) { showError("Choose a picture first: boxes are drawn on it."); return; }
  if (!query) { showError("Type what to find in the question box (for example: every car), then press Find."); return; }
  if (state.controller) return;
  $("question").value = "";
  const { max_pixels } = options();
  const body = { image: state.image.dataUrl, query, stream: true, max_tokens: 256, max_pixels,
                 __thumb: state.image.dataUrl };
  let final = null;
  // the last NDJSON object carries the boxes; keep it while streaming the raw answer
  const wrapped = async function* (r) {
    for await (const line of readLines(r, "\n")) {
      const obj = JSON.parse(line);
      if (obj.done) final = obj;
      if (obj.error) { yield { error: obj.error }; return; }
      yield { text: obj.token, reasoning: obj.reasoning, timings: obj.timings, usage: obj.usage };
    }
  };
  await run("/api/detect", body, `Find: ${query}`, wrapped);
  if (final && final.boxes) {
    drawBoxes(final.boxes, final.image);
    const last = [...document.querySelectorAll(".msg.assistant")].pop();
    const s = document.createElement("div");
    s.className = "stats";
    s.textContent = `${final.boxes.length} box(es) drawn on the picture` + (final.dropped ? `, ${final.dropped} malformed dropped` : "");
    last?.append(s);
  }
}

// ---- wiring
function init() {
  $("messages").innerHTML = '<p class="empty-chat">Choose a picture, then ask a question or pick a quick job.</p>';
  $("file").addEventListener("change", (e) => { loadFile(e.target.files[0]); e.target.value = ""; });
  $("camera").addEventListener("change", (e) => { loadFile(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); loadFile(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file");
    if (item) loadFile(item.getAsFile());
  });
  $("clear-image").addEventListener("click", () => { setVideo(null); setImage(null); });
  $("max-pixels").addEventListener("change", updateSizeNote);
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("question").value;
    $("question").value = "";
    ask(q);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", () => {
    state.controller?.abort();
    state.history = []; state.imageSent = false; showError("");
    $("messages").innerHTML = '<p class="empty-chat">New conversation.</p>';
  });
  for (const b of document.querySelectorAll("[data-preset]")) {
    const p = b.dataset.preset;
    b.addEventListener("click", () => (p === "ocr" ? ocr() : p === "find" ? find() : ask(PRESETS[p])));
  }
  refreshHealth();
  setInterval(refreshHealth, 5000);
}

init();
