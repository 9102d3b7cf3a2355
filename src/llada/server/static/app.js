// The chat page: sends the conversation to /v1/chat/completions with `denoising: true`, shows each
// step's canvas as it streams in, keeps every step for the replay slider, and appends the final answer
// to the conversation. Plain ES modules, no build step; every URL is relative to the page.

import { Recording, renderStep, scaleGradient } from "./canvas.js";
import { readEvents } from "./sse.js";

const $ = (id) => document.getElementById(id);

const STORAGE_SETTINGS = "llada.settings";
const STORAGE_API_KEY = "llada.apiKey";
const PLAY_INTERVAL_MS = 120;

const state = {
  history: [], // the conversation sent with each request: {role, content}
  controller: null, // AbortController of the request in flight
  shown: null, // the Recording in the canvas panel
  following: true, // the slider moves to each new step (false once the user scrubs back)
  playTimer: null,
};

// ---------------------------------------------------------------------------------------------------
// Status, errors, busy state

function setState(name, status) {
  $("app").dataset.state = name;
  $("status").textContent = status;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

/** The message of an OpenAI-style error response, or its status line when the body has none. */
async function errorMessage(response) {
  const fallback = `${response.status} ${response.statusText}`.trim();
  const text = await response.text().catch(() => "");
  try {
    const message = JSON.parse(text)?.error?.message;
    if (message) return `${message} (HTTP ${response.status})`;
  } catch {
    // not JSON: fall through to the raw text
  }
  return text ? `${fallback}: ${text.slice(0, 300)}` : fallback;
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---------------------------------------------------------------------------------------------------
// Settings

const SETTING_IDS = ["max-tokens", "block-length", "policy", "threshold", "factor", "steps", "cache", "remasking",
  "temperature", "cfg-scale", "seed", "system-prompt"];

function numberField(id) {
  const value = $(id).value.trim();
  if (value === "") return undefined;
  const number = Number(value);
  return Number.isFinite(number) ? number : undefined;
}

/** The request fields the settings ask for; empty fields are left to the server's defaults. */
function requestSettings() {
  const policy = $("policy").value;
  const fields = {
    max_tokens: numberField("max-tokens"),
    block_length: numberField("block-length"),
    policy,
    threshold: policy === "threshold" ? numberField("threshold") : undefined,
    factor: policy === "factor" ? numberField("factor") : undefined,
    steps: policy === "fixed" ? numberField("steps") : undefined,
    cache: $("cache").value,
    remasking: $("remasking").value,
    temperature: numberField("temperature"),
    cfg_scale: numberField("cfg-scale"),
    seed: numberField("seed"),
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

const POLICY_HINTS = {
  threshold: "Each step decides every masked position whose confidence exceeds the threshold (at least one).",
  fixed: "Each step decides the same number of positions; steps defaults to max tokens (one per step).",
  factor: "With confidences sorted c1 ≥ c2 ≥ …, each step decides the longest prefix with cn ≥ 1 − f/(n+1) (at least one).",
};

function applyPolicy() {
  const policy = $("policy").value;
  $("threshold").disabled = policy !== "threshold";
  $("factor").disabled = policy !== "factor";
  $("steps").disabled = policy !== "fixed";
  $("policy-hint").textContent = POLICY_HINTS[policy] ?? "";
}

function saveSettings() {
  const values = Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]));
  localStorage.setItem(STORAGE_SETTINGS, JSON.stringify(values));
  localStorage.setItem(STORAGE_API_KEY, $("api-key").value);
}

function restoreSettings() {
  let values = {};
  try {
    values = JSON.parse(localStorage.getItem(STORAGE_SETTINGS) ?? "{}") ?? {};
  } catch {
    localStorage.removeItem(STORAGE_SETTINGS);
  }
  for (const id of SETTING_IDS) if (typeof values[id] === "string") $(id).value = values[id];
  $("api-key").value = localStorage.getItem(STORAGE_API_KEY) ?? "";
  applyPolicy();
}

// ---------------------------------------------------------------------------------------------------
// Models

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  setState("idle", "Loading models…");
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const ids = ((await response.json()).data ?? []).map((model) => model.id);
    select.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(previous)) select.value = previous;
    clearError();
    setState("idle", ids.length ? "Ready" : "The server lists no models");
  } catch (error) {
    showError(`Could not list the models: ${error.message}`);
    setState("error", "No models");
  }
}

// ---------------------------------------------------------------------------------------------------
// Conversation

function addMessage(role, text) {
  $("empty-hint")?.remove();
  const message = document.createElement("article");
  message.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "LLaDA";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  message.append(label, content);
  $("messages").append(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

function addMeta(message, text, recording) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.append(text);
  if (recording.steps) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "show-canvas";
    button.textContent = "Show canvas";
    button.addEventListener("click", () => showRecording(recording));
    meta.append(" ", button);
  }
  message.append(meta);
}

// ---------------------------------------------------------------------------------------------------
// Canvas panel and replay

function showRecording(recording) {
  stopPlaying();
  state.shown = recording;
  state.following = true;
  $("canvas-panel").hidden = false;
  if (recording.steps) showStep(recording.steps);
  else {
    $("canvas").replaceChildren();
    updateReplay(0);
  }
}

/** Render step `step` of the shown recording and bring the slider, legend and info along. */
function showStep(step) {
  const recording = state.shown;
  renderStep($("canvas"), recording, step);
  updateReplay(step);
  const total = recording.frames[step - 1].tokens.length;
  $("canvas-info").textContent = `step ${step} of ${recording.steps} · ${recording.decidedBy(step)} of ${total} decided`;
  $("legend-last").textContent = String(recording.steps);
}

function updateReplay(step) {
  const slider = $("replay");
  const steps = state.shown?.steps ?? 0;
  slider.max = String(Math.max(steps, 1));
  slider.value = String(Math.max(step, 1));
  slider.disabled = steps < 2;
  slider.setAttribute("aria-valuetext", steps ? `step ${step} of ${steps}` : "no steps yet");
  $("replay-value").textContent = steps ? `${step} / ${steps}` : "–";
  $("play").disabled = steps < 2;
}

function onStepRecorded(recording) {
  if (state.shown !== recording) return;
  if (state.following) showStep(recording.steps);
  else updateReplay(Number($("replay").value));
}

function stopPlaying() {
  if (state.playTimer === null) return;
  clearInterval(state.playTimer);
  state.playTimer = null;
  $("play").innerHTML = "&#9654;";
  $("play").setAttribute("aria-label", "Play the steps");
}

function togglePlay() {
  if (state.playTimer !== null) {
    stopPlaying();
    return;
  }
  const recording = state.shown;
  let step = Number($("replay").value);
  if (step >= recording.steps) step = 0;
  state.following = false;
  $("play").innerHTML = "&#10074;&#10074;";
  $("play").setAttribute("aria-label", "Pause");
  state.playTimer = setInterval(() => {
    step += 1;
    showStep(Math.min(step, recording.steps));
    if (step >= recording.steps) {
      state.following = true;
      stopPlaying();
    }
  }, PLAY_INTERVAL_MS);
}

// ---------------------------------------------------------------------------------------------------
// Generation

function requestMessages() {
  const system = $("system-prompt").value.trim();
  return system ? [{ role: "system", content: system }, ...state.history] : [...state.history];
}

async function send(text) {
  clearError();
  const userMessage = addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const body = { model: $("model").value, messages: requestMessages(), stream: true, denoising: true,
    stream_options: { include_usage: true }, ...requestSettings() };

  const recording = new Recording();
  const answer = addMessage("assistant", "");
  answer.classList.add("pending");
  showRecording(recording);
  $("canvas-info").textContent = "waiting for the first step…";

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setState("generating", "Generating…");
  const started = performance.now();
  let content = "";
  let finishReason = null;
  let usage = null;
  const elapsed = () => `${((performance.now() - started) / 1000).toFixed(1)} s`;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of readEvents(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message ?? JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      // The usage chunk (stream_options.include_usage) has no choices; every other chunk has one.
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        content += choice.delta.content;
        answer.querySelector(".content").textContent = content;
      }
      if (choice?.finish_reason) finishReason = choice.finish_reason;
      if (chunk.canvas) {
        recording.add(chunk.canvas);
        onStepRecorded(recording); // the step count goes to the canvas info, not to the (announced) status
      }
    }
    answer.classList.remove("pending");
    state.history.push({ role: "assistant", content });
    const reason = finishReason === "length" ? " · hit max tokens" : "";
    const tokens = usage ? ` · ${usage.completion_tokens} tokens` : "";
    addMeta(answer, `${recording.steps} steps${tokens} · ${elapsed()}${reason}`, recording);
    setState("done", `Done: ${recording.steps} steps in ${elapsed()}`);
  } catch (error) {
    if (!answer.isConnected) return; // "New chat" cleared the conversation
    if (error.name === "AbortError") {
      answer.classList.replace("pending", "stopped");
      if (content) state.history.push({ role: "assistant", content });
      addMeta(answer, `stopped after ${recording.steps} steps`, recording);
      setState("stopped", "Stopped");
    } else {
      // Nothing was answered: take the question back so that it can be sent again after a fix.
      answer.remove();
      userMessage.remove();
      state.history.pop();
      if (!$("prompt").value) $("prompt").value = text;
      if (recording.steps === 0) $("canvas-panel").hidden = true;
      showError(error.message);
      setState("error", "Error");
    }
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
}

function newChat() {
  state.controller?.abort();
  state.controller = null;
  setBusy(false);
  stopPlaying();
  state.history = [];
  state.shown = null;
  $("messages").replaceChildren();
  $("canvas-panel").hidden = true;
  clearError();
  setState("idle", "Ready");
}

// ---------------------------------------------------------------------------------------------------
// Wiring

function main() {
  document.querySelector(".legend-bar").style.backgroundImage = scaleGradient();
  restoreSettings();

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("replay").addEventListener("input", () => {
    stopPlaying();
    const step = Number($("replay").value);
    state.following = step === state.shown.steps;
    showStep(step);
  });
  $("play").addEventListener("click", togglePlay);
  $("settings").addEventListener("change", () => {
    applyPolicy();
    saveSettings();
  });
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  $("api-key").addEventListener("change", loadModels);
  $("reset-settings").addEventListener("click", () => {
    const key = $("api-key").value;
    $("settings").reset();
    $("api-key").value = key;
    applyPolicy();
    saveSettings();
  });
  $("new-chat").addEventListener("click", newChat);

  loadModels();
}

main();
