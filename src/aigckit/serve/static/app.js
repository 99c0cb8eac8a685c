// aigckit playground: plain JavaScript against the server's OpenAI-compatible API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], history: [], controller: null, speaking: null };

// ---------------------------------------------------------------------------------------------- API helpers
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error.message || JSON.stringify(body.error);
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

function status(text) { $("status").textContent = text || ""; }

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) { status("Could not list models: " + (await errorMessage(resp))); return; }
  status("");
  state.models = (await resp.json()).data;
  fill($("chat-model"), state.models.filter((m) => m.kind === "text"));
  fill($("image-model"), state.models.filter((m) => m.kind === "image"));
  fill($("voice-model"), state.models.filter((m) => m.kind === "speech"));
  onImageModel();
}

function fill(select, models) {
  const prev = select.value;
  select.innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.id + (m.kind === "text" && m.chat === false ? " (no chat template)" : "");
    select.appendChild(o);
  }
  if (!models.length) {
    const o = document.createElement("option");
    o.textContent = "(none served)";
    o.value = "";
    select.appendChild(o);
  }
  if ([...select.options].some((o) => o.value === prev)) select.value = prev;
}

// ---------------------------------------------------------------------------------------------- tabs
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === tab.dataset.panel);
  });
}

// ---------------------------------------------------------------------------------------------- sliders
for (const id of ["temperature", "top-p", "max-tokens"]) {
  const input = $(id);
  const show = () => { $(id + "-val").textContent = input.value; };
  input.addEventListener("input", show);
  show();
}

// ---------------------------------------------------------------------------------------------- chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setStreaming(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads an SSE body: calls onData(obj) for every `data: {...}` event until `data: [DONE]`.
async function readSSE(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let idx;
    while ((idx = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, idx);
      buf = buf.slice(idx + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const model = $("chat-model").value;
  if (!model) { status("No text model is served."); return; }
  status("");
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".text");
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const t0 = performance.now();
  let ttft = null, tokens = 0, finish = null, answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model, messages, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value), top_p: Number($("top-p").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    await readSSE(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          if (ttft === null) ttft = performance.now() - t0;
          answer += c.delta.content;
          out.textContent = answer;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      div.classList.add("error");
      out.textContent = (answer ? answer + "\n" : "") + "Error: " + e.message;
      finish = "error";
    }
  } finally {
    state.controller = null;
    setStreaming(false);
  }
  const meta = document.createElement("span");
  meta.className = "meta";
  const secs = (performance.now() - t0) / 1000;
  meta.textContent = `${finish || "done"} · ${tokens || "?"} tokens · ${secs.toFixed(2)} s` +
    (ttft !== null ? ` · first token ${(ttft / 1000).toFixed(2)} s` : "");
  div.appendChild(meta);
  div.dataset.finish = finish || "";
  if (finish !== "error") state.history.push({ role: "assistant", content: answer });
  if (finish !== "error" && answer.trim() && $("voice-model").value) {
    const btn = document.createElement("button");
    btn.className = "speak secondary";
    btn.textContent = "🔊 Speak";
    btn.title = "read this reply aloud (POST /v1/audio/speech)";
    btn.addEventListener("click", () => speak(answer, btn));
    meta.appendChild(btn);
  }
}

// ---------------------------------------------------------------------------------------------- speech
// Plays a reply through /v1/audio/speech as it streams: raw 16-bit PCM at 24 kHz, each piece scheduled on a Web
// Audio clock right after the previous one, so the first sentence plays while the rest is synthesised.
const PCM_RATE = 24000;

async function speak(text, btn) {
  if (state.speaking) { state.speaking.stop(); return; }
  const controller = new AbortController();
  const ctx = new AudioContext({ sampleRate: PCM_RATE });
  state.speaking = { stop: () => { controller.abort(); ctx.close(); } };
  btn.textContent = "■ Stop";
  btn.dataset.state = "loading";
  let bytes = 0, end = 0, rest = new Uint8Array(0);
  try {
    const resp = await fetch("/v1/audio/speech", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("voice-model").value, voice: "default", input: text.slice(0, 4096),
                             response_format: "pcm" }),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const buf = new Uint8Array(rest.length + value.length);
      buf.set(rest);
      buf.set(value, rest.length);
      const n = buf.length >> 1;
      rest = buf.slice(2 * n);
      if (!n) continue;
      const view = new DataView(buf.buffer, 0, 2 * n);
      const audio = ctx.createBuffer(1, n, PCM_RATE);
      const samples = audio.getChannelData(0);
      for (let i = 0; i < n; i++) samples[i] = view.getInt16(2 * i, true) / 32768;
      const src = ctx.createBufferSource();
      src.buffer = audio;
      src.connect(ctx.destination);
      end = Math.max(end, ctx.currentTime + 0.05);
      src.start(end);
      end += audio.duration;
      bytes += 2 * n;
      btn.dataset.state = "playing";
    }
    btn.dataset.bytes = String(bytes);
    while (ctx.currentTime < end && !controller.signal.aborted && ctx.state === "running") {
      await new Promise((r) => setTimeout(r, 100));
    }
    btn.dataset.state = "done";
  } catch (e) {
    btn.dataset.bytes = String(bytes);
    if (e.name === "AbortError") {
      btn.dataset.state = "stopped";
    } else {
      btn.dataset.state = "error";
      status("Speech failed: " + e.message);
    }
  } finally {
    if (ctx.state !== "closed") ctx.close();
    state.speaking = null;
    btn.textContent = "🔊 Speak";
  }
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.controller) return;
  $("chat-input").value = "";
  send(text);
});
$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("clear").addEventListener("click", () => { state.history = []; $("messages").innerHTML = ""; });

// ---------------------------------------------------------------------------------------------- images
function onImageModel() {
  const m = state.models.find((x) => x.id === $("image-model").value);
  const sel = $("image-class");
  sel.innerHTML = "";
  const add = (value, label) => {
    const o = document.createElement("option");
    o.value = value; o.textContent = label; sel.appendChild(o);
  };
  if (m && m.conditional) {
    add("", "(cycle through all classes)");
    for (const c of m.classes) add(c, c);
    sel.disabled = false;
  } else {
    add("", m ? "(unconditional model)" : "(no image model)");
    sel.disabled = true;
  }
  const text = Boolean(m && m.text_conditioned);  // free-text prompt instead of a class
  $("class-label").hidden = text;
  $("prompt-label").hidden = !text;
  $("negative-label").hidden = !text;
  const diffusion = m && (m.family === "ddpm" || m.family === "ldm");  // pixel or latent diffusion
  $("image-steps").disabled = !diffusion;
  $("steps-label").style.opacity = diffusion ? 1 : 0.45;
  if (diffusion && m.timesteps) $("image-steps").max = m.timesteps;
  $("image-info").textContent = m ? `${m.family}, ${m.size}` : "";
}
$("image-model").addEventListener("change", onImageModel);

$("generate").addEventListener("click", async () => {
  const m = state.models.find((x) => x.id === $("image-model").value);
  if (!m) { status("No image model is served."); return; }
  status("");
  const body = { model: m.id, prompt: m.text_conditioned ? $("image-prompt").value : $("image-class").value,
                 n: Number($("image-n").value), response_format: "b64_json" };
  const negative = $("image-negative").value.trim();
  if (m.text_conditioned && negative !== "") body.negative_prompt = negative;
  const seed = $("image-seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  if (m.family === "ddpm" || m.family === "ldm") {
    const steps = Number($("image-steps").value);
    if (steps > 0) body.steps = Math.min(steps, m.timesteps || steps);
  }
  $("generate").disabled = true;
  $("generate").textContent = "Generating…";
  try {
    const resp = await fetch("/v1/images/generations", { method: "POST", headers: headers(),
                                                          body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const result = await resp.json();
    const gallery = $("gallery");
    for (const item of result.data.slice().reverse()) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + item.b64_json;
      const p = item.parameters || {};
      img.alt = p.class ? `generated ${p.class}` : "generated image";
      const cap = document.createElement("figcaption");
      const parts = [m.id];
      if (p.class !== undefined) parts.push(`class ${p.class}`);
      if (m.text_conditioned && p.prompt) parts.push(`"${p.prompt}"`);
      parts.push(`seed ${p.seed}`);
      if (p.sampler) parts.push(`${p.sampler} ${p.steps} steps`);
      if (p.guidance !== undefined && p.sampler) parts.push(`guidance ${p.guidance}`);
      parts.push(`#${p.index}`);
      cap.textContent = parts.join(" · ");
      fig.append(img, cap);
      gallery.prepend(fig);
    }
  } catch (e) {
    status("Image generation failed: " + e.message);
  } finally {
    $("generate").disabled = false;
    $("generate").textContent = "Generate";
  }
});

// ---------------------------------------------------------------------------------------------- start
$("api-key").value = localStorage.getItem("aigc-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("aigc-api-key", $("api-key").value.trim());
  loadModels();
});
loadModels();
