// sea-serve playground: runs a job through the job API and draws it live. Plain ES modules, nothing from outside.
import { Api, endpoint, pause } from "./api.js";
import { color, drawChart } from "./chart.js";
import { curlCommand, fmt, seconds, segments } from "./format.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "sea-serve.apiKey";
const apiKey = () => $("api-key").value.trim();
const api = new Api(apiKey);
const ui = { mode: "text", method: "sea", run: null };
const UNITS = { bon: "Sample", cbs: "Beam", args: "Decoding" }; // what a method's result rows are (SEA's: chains)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setRunState(state) {
  document.body.dataset.runState = state; // idle, running, done, failed, cancelled, invalid (tests wait on it)
}

const setStatus = (text) => { $("run-status").textContent = text; };
const setProgress = (fraction) => { $("progress-bar").style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`; };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// ---------------------------------------------------------------- the form

// An invalid field: the message names it, and `field` is its id (to focus it).
function invalid(id, problem) {
  const label = $(id).closest(".field").querySelector(".label").firstChild.textContent.trim();
  return Object.assign(new Error(`${label}: ${problem}`), { field: id });
}

function number(id) {
  if ($(id).validity.badInput) throw invalid(id, "not a number."); // the browser reports such text as ""
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function keywords() {
  return $("keywords").value.split(",").map((w) => w.trim()).filter(Boolean);
}

function readMessages() {
  return [...$("messages").querySelectorAll(".message")].map((row) => ({
    role: row.querySelector("select").value,
    content: row.querySelector("textarea").value,
  }));
}

// The request body for POST /jobs and POST /align; empty fields are left out and take the server's defaults.
// Throws invalid(...) for a field the server would not get as typed.
function buildRequest() {
  const body = {};
  if (ui.mode === "chat") body.messages = readMessages();
  else body.prompt = $("prompt").value;
  body.method = ui.method;
  if (ui.method === "sea") {
    body.chains = number("chains");
    body.steps = number("steps");
  } else if (ui.method === "bon") {
    body.samples = number("chains");
  } else if (ui.method === "cbs") {
    body.beams = number("chains");
  }
  body.alpha = number("alpha");
  body.max_tokens = number("max-tokens");
  body.seed = number("seed");
  body.temperature = number("temperature");
  const words = keywords();
  if ($("keywords-only").checked && !words.length) throw invalid("keywords", "“Keyword reward only” needs at least one keyword.");
  if (words.length) {
    body.reward = { keywords: words };
    if ($("keywords-only").checked) body.reward.keywords_only = true;
  }
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

// The plain reference-model sample for the same prompt, seed, length and reward (so that its scores compare).
function referenceRequest(body) {
  const ref = { ...body, method: "sample" };
  delete ref.chains;
  delete ref.steps;
  delete ref.samples;
  delete ref.beams;
  return ref;
}

function addMessage(role, content) {
  const row = el("div", "message");
  const select = el("select");
  select.setAttribute("aria-label", "Role");
  for (const name of ["system", "user", "assistant"]) {
    const option = el("option", "", name);
    option.value = name;
    select.append(option);
  }
  select.value = role;
  const text = el("textarea");
  text.rows = 2;
  text.value = content;
  text.setAttribute("aria-label", "Message");
  const remove = el("button", "ghost", "×");
  remove.type = "button";
  remove.title = "Remove this message";
  remove.addEventListener("click", () => {
    // Keep keyboard focus nearby: the previous message, else the add button.
    const previous = row.previousElementSibling;
    row.remove();
    (previous ? previous.querySelector("textarea") : $("add-message")).focus();
  });
  row.append(select, text, remove);
  $("messages").append(row);
}

function setMode(mode) {
  ui.mode = mode;
  for (const [id, on] of [["mode-text", mode === "text"], ["mode-chat", mode === "chat"]]) {
    $(id).classList.toggle("active", on);
    $(id).setAttribute("aria-pressed", String(on));
  }
  $("text-prompt").hidden = mode !== "text";
  $("chat-prompt").hidden = mode !== "chat";
  if (mode === "chat" && !$("messages").children.length) {
    addMessage("system", "You are a helpful assistant.");
    addMessage("user", $("prompt").value);
  }
}

function setMethod(method) {
  ui.method = method;
  for (const button of document.querySelectorAll("[data-method]")) {
    const on = button.dataset.method === method;
    button.classList.toggle("active", on);
    button.setAttribute("aria-pressed", String(on));
  }
  for (const node of document.querySelectorAll(".sea-only")) node.hidden = method !== "sea";
  $("chains").closest(".field").hidden = method === "sample" || method === "args";
  $("chains-label").textContent = { bon: "Samples (N)", cbs: "Beams (W)" }[method] || "Chains";
}

// ---------------------------------------------------------------- live chains

function drawCharts(run) {
  const energy = run.history.map((chain) => chain.map((e) => e && e.energy));
  const reward = run.history.map((chain) => chain.map((e) => e && e.reward));
  const chosen = run.result ? run.result.chosen : null;
  const options = {
    steps: run.steps ?? 0,
    highlight: chosen,
    heads: !run.result,
    marker: chosen === null ? null : { chain: chosen, step: run.result.chains[chosen].best_step }, // the returned iterate
    empty: run.result ? "No finite values to plot." : "Waiting for the initial samples…",
  };
  drawChart($("chart-energy"), energy, options);
  drawChart($("chart-reward"), reward, options);
}

function renderText(node, text, pieces, changed) {
  node.replaceChildren();
  if (!pieces) {
    node.textContent = text;
    return;
  }
  for (const seg of segments(text, pieces, changed || [])) {
    node.append(seg.changed ? el("mark", "tok changed", seg.text) : document.createTextNode(seg.text));
  }
}

function chainCard(run, i) {
  if (run.cards[i]) return run.cards[i];
  const card = el("article", "chain");
  card.dataset.chain = String(i);
  card.style.setProperty("--chain-color", color(i));
  const head = el("div", "chain-head");
  const name = el("span", "chain-name");
  const swatch = el("span", "swatch");
  swatch.style.background = color(i);
  name.append(swatch, document.createTextNode(`${UNITS[run.method] || "Chain"} #${i}`));
  const badge = el("span", "badge", "chosen");
  badge.hidden = true;
  head.append(name, badge);
  const text = el("p", "text");
  const stats = el("div", "chain-stats");
  card.append(head, text, stats);
  $("chain-list").append(card);
  run.cards[i] = { card, badge, text, stats };
  return run.cards[i];
}

function renderStats(node, entries) {
  node.replaceChildren(...entries.map(([label, value]) => el("span", "", `${label} ${value}`)));
}

function onStep(run, event) {
  run.stepped = true;
  run.steps = event.steps;
  event.chains.forEach((chain, i) => {
    (run.history[i] ||= [])[event.step] = chain;
    const card = chainCard(run, i);
    renderText(card.text, chain.text ?? "", chain.pieces, chain.changed_positions);
    renderStats(card.stats, [["E", fmt(chain.energy)], ["r", fmt(chain.reward)], ["log π_ref", fmt(chain.log_prob_ref)],
      ["changed", `${Math.round((chain.changed || 0) * 100)}%`]]);
  });
  setStatus(event.step === 0 ? `Initial samples (step 0 of ${event.steps})` : `Step ${event.step} of ${event.steps}`);
  setProgress(event.steps ? event.step / event.steps : 1);
  drawCharts(run);
}

// ---------------------------------------------------------------- the result

function scoreList(node, result, other) {
  const rows = [ // label, value, the other's value, +1 when higher is better
    ["reward", result.reward, other && other.reward, 1],
    ["log π_ref", result.log_prob_ref, other && other.log_prob_ref, 1],
    ["energy", result.energy, other && other.energy, -1],
    ["energy / token", result.energy_per_token, other && other.energy_per_token, -1],
  ];
  node.replaceChildren(...rows.map(([label, value, base, better]) => {
    const item = el("div");
    const dd = el("dd", "", fmt(value));
    if (typeof base === "number" && Number.isFinite(base) && Number.isFinite(value) && Math.abs(value - base) > 5e-4) {
      const delta = value - base;
      dd.append(" ", el("span", delta * better > 0 ? "up" : "down", `${delta > 0 ? "+" : ""}${fmt(delta)}`));
    }
    item.append(el("dt", "", label), dd);
    return item;
  }));
}

function inlineList(node, entries) {
  node.replaceChildren(...entries.map(([label, value]) => {
    const item = el("div");
    item.append(el("dt", "", label), el("dd", "", value));
    return item;
  }));
}

function showResult(run, result) {
  run.result = result;
  setProgress(1);
  if (run.method === "sea") {
    // Step 0 from the result's initial scores where the stream did not carry it.
    result.chains.forEach((chain, i) => {
      const history = (run.history[i] ||= []);
      if (!history[0]) history[0] = chain.initial;
    });
  }
  result.chains.forEach((chain, i) => {
    // Each chain shows its returned iterate (best_step), marked against its initial sample.
    const card = chainCard(run, i);
    const at = run.history[i] && run.history[i][chain.best_step];
    renderText(card.text, chain.text, at && at.text === chain.text ? at.pieces : null, at && at.changed_positions);
    const entries = [["E", fmt(chain.energy)], ["r", fmt(chain.reward)], ["log π_ref", fmt(chain.log_prob_ref)]];
    if (run.method === "sea") entries.push(["best at step", String(chain.best_step)]);
    renderStats(card.stats, entries);
    card.badge.hidden = i !== result.chosen;
    card.card.classList.toggle("chosen", i === result.chosen);
  });
  drawCharts(run);

  const label = { sea: "SEA", bon: "Best-of-N", args: "ARGS", cbs: "Beam search", sample: "Sample" }[result.method] || result.method;
  const unit = (UNITS[result.method] || "chain").toLowerCase();
  $("aligned-title").textContent = { sample: "Sample (π_ref)", args: "ARGS" }[result.method] || `${label} · ${unit} #${result.chosen}`;
  $("final-text").textContent = result.text;
  scoreList($("aligned-scores"), result, null);
  $("result-meta").textContent = `${result.model} · finish: ${result.finish_reason} · ${result.usage.completion_tokens} tokens`;
  const sea = result.method === "sea"; // the baselines have no Langevin phase
  inlineList($("timings"), [
    ["queue", seconds(result.timings.queue)], [sea ? "init" : "run", seconds(result.timings.init)],
    ...(sea ? [["Langevin", seconds(result.timings.langevin)]] : []), ["total", seconds(result.timings.total)],
    ...(sea ? [["steps", String(result.timings.steps)]] : []), ["prompt tokens", String(result.usage.prompt_tokens)],
  ]);
  $("curl").textContent = curlCommand(endpoint("align"), run.body, Boolean(apiKey()));
  $("reference-text").closest(".card").hidden = result.method === "sample";
  $("result").hidden = false;
}

async function showReference(run, signal) {
  const text = $("reference-text");
  text.replaceChildren(el("span", "muted", "sampling…"));
  setStatus("Sampling the reference model for comparison…");
  try {
    const created = await submit(run, referenceRequest(run.body));
    run.jobId = created.id; // what Stop cancels now
    const job = await api.followJob(created.id, signal, null);
    if (job.status !== "succeeded") throw new Error(job.error || `the job ${job.status}`);
    text.textContent = job.result.text;
    scoreList($("reference-scores"), job.result, null);
    scoreList($("aligned-scores"), run.result, job.result);
  } catch (error) {
    const why = error.name === "AbortError" ? "stopped." : error.message;
    text.replaceChildren(el("span", "muted", `No reference sample: ${why}`));
    if (error.name === "AbortError") throw error;
  }
}

// ---------------------------------------------------------------- a run

function resetOutput(method) {
  $("chains-title").textContent = { sea: "Langevin chains", bon: "Best-of-N samples", args: "ARGS decoding", cbs: "Beam search beams",
    sample: "Reference sample" }[method];
  $("charts").hidden = method !== "sea";
  $("legend-note").hidden = method !== "sea";
  $("chain-list").replaceChildren();
  $("result").hidden = true;
  $("reference-scores").replaceChildren();
  $("aligned-scores").replaceChildren();
  setProgress(0);
  for (const id of ["chart-energy", "chart-reward"]) drawChart($(id), [], { empty: "Waiting for the initial samples…" });
}

function setRunning(running) {
  // Focus goes to the button that acts now: Stop when a run starts; Run when it ends, unless the user went elsewhere.
  const focused = document.activeElement;
  const refocus = running || focused === $("stop") || focused === document.body;
  $("run").disabled = running;
  $("stop").disabled = !running;
  $("run").textContent = running ? "Running…" : "Run";
  if (refocus) $(running ? "stop" : "run").focus();
}

// While no step event says more (the baselines send none): the queue position, then "Running", from GET /jobs/{id}.
async function watchJob(run, id, signal) {
  try {
    while (run.following && !run.stepped) {
      const job = await api.getJob(id, signal);
      if (!run.following || run.stepped) return;
      if (job.status === "running") {
        setStatus(`Running ${id}…`);
        return;
      }
      if (job.status !== "queued") return;
      setStatus(`Queued as ${id}${typeof job.position === "number" ? ` (${job.position} ahead)` : ""}`);
      await pause(1000, signal);
    }
  } catch (_) { /* stopped, or the event stream reports the problem */ }
}

// POST /jobs that Stop cannot lose: the request is not aborted at once (a job the server already took would run on
// unseen); once it answers after Stop, its job is cancelled. A POST still unanswered 3 s after Stop is given up.
async function submit(current, body) {
  current.submitting = new AbortController();
  try {
    const created = await api.submitJob(body, current.submitting.signal);
    if (current.stopRequested) {
      await api.cancelJob(created.id).catch(() => {});
      throw new DOMException("stopped before the job was created", "AbortError");
    }
    return created;
  } finally {
    current.submitting = null;
  }
}

async function run(event) {
  event.preventDefault();
  if (ui.run) return;
  clearError();
  let body;
  try {
    body = buildRequest();
  } catch (error) {
    showError(error.message);
    $(error.field).focus();
    setStatus("Not submitted: fix the form.");
    setRunState("invalid");
    return;
  }
  const current = { body, method: body.method, controller: new AbortController(), jobId: null, started: performance.now(),
    submitting: null, stopRequested: false, abandoned: false, steps: body.steps ?? null, history: [], cards: [], result: null, following: false, stepped: false };
  ui.run = current;
  setRunning(true);
  setRunState("running");
  const signal = current.controller.signal;
  try {
    setStatus("Submitting the job…");
    const created = await submit(current, body);
    current.jobId = created.id;
    resetOutput(body.method); // only now: a refused request leaves the last run's output on the page
    setStatus(`Queued as ${created.id}`);
    current.following = true;
    watchJob(current, created.id, signal);
    const job = await api.followJob(created.id, signal, (step) => onStep(current, step)).finally(() => { current.following = false; });
    current.jobId = null; // it has ended: Stop now aborts what follows
    if (job.status === "cancelled") {
      setStatus("Cancelled.");
      setRunState("cancelled");
      return;
    }
    if (job.status !== "succeeded") throw new Error(job.error || `the job ${job.status}`);
    // The seed the server drew when the form left it blank: the curl command repeats this run and the reference sample
    // shares its seed.
    if (current.body.seed === undefined && Number.isInteger(job.result.seed)) current.body = { ...current.body, seed: job.result.seed };
    showResult(current, job.result);
    if (body.method !== "sample") await showReference(current, signal);
    const steps = body.method === "sea" ? ` (${job.result.timings.steps} steps)` : "";
    setStatus(`Done in ${seconds(job.result.timings.total)}${steps}`);
    setRunState("done");
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus(current.abandoned ? "Stopped; the server had not answered, so the job may still run." : "Stopped.");
      setRunState("cancelled");
    } else {
      const still = error.unreachable && current.jobId ? ` The job ${current.jobId} may still be running.` : "";
      showError(error.message + still);
      setStatus("Failed.");
      setRunState("failed");
      if (error.unreachable) checkServer();
    }
  } finally {
    ui.run = null;
    setRunning(false);
  }
}

async function stop(event) {
  const current = ui.run;
  if (!current) return;
  // A run started with Enter moves the focus to Stop: an Enter pressed twice (or held) must not stop it at once.
  if (event && event.detail === 0 && performance.now() - current.started < 800) return;
  if (current.submitting) {
    current.stopRequested = true; // the POST is on its way: its job is cancelled once the server names it
    setStatus("Stopping…");
    const waiting = current.submitting;
    setTimeout(() => {
      if (current.submitting !== waiting) return;
      current.abandoned = true;
      waiting.abort();
    }, 3000);
    return;
  }
  if (current.jobId) {
    try {
      await api.cancelJob(current.jobId); // the event stream then ends with the cancelled job
      if (!current.result) return;
    } catch (_) { /* gone or unreachable: stop waiting for it */ }
  }
  current.controller.abort(); // also while the reference sample runs: the aligned result stays
}

async function copyCurl() {
  try {
    await navigator.clipboard.writeText($("curl").textContent);
  } catch (_) {
    // Not a secure context: select the text so that Ctrl+C copies it.
    const range = document.createRange();
    range.selectNodeContents($("curl"));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("copy-curl").textContent = "Copied";
  setTimeout(() => { $("copy-curl").textContent = "Copy"; }, 1500);
}

// The server's state in the pill: checked every 15 s while ready, every 3 s otherwise, and at once when a run loses it.
async function checkServer() {
  clearTimeout(checkServer.timer);
  const pill = $("server-status");
  let ready = false;
  try {
    const [ok, body] = await api.ready();
    ready = ok;
    pill.textContent = ok ? `${body.model} · ready` : (body.error && body.error.message) || "not ready";
    pill.className = ok ? "pill pill-ok" : "pill pill-wait";
  } catch (_) {
    pill.textContent = "server unreachable";
    pill.className = "pill pill-bad";
  }
  checkServer.timer = setTimeout(checkServer, ready ? 15000 : 3000);
}

// ---------------------------------------------------------------- start-up

function init() {
  try {
    $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  } catch (_) { /* storage disabled: the key lasts for this page only */ }
  $("api-key").addEventListener("input", () => {
    try {
      if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) { /* storage disabled */ }
  });
  $("mode-text").addEventListener("click", () => setMode("text"));
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("add-message").addEventListener("click", () => addMessage("user", ""));
  for (const button of document.querySelectorAll("[data-method]")) {
    button.addEventListener("click", () => setMethod(button.dataset.method));
  }
  $("run-form").addEventListener("submit", run);
  // Ctrl+Enter (⌘+Enter) runs from the prompt and the messages, where Enter writes a new line.
  $("run-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.tagName === "TEXTAREA") {
      event.preventDefault();
      $("run-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("copy-curl").addEventListener("click", copyCurl);
  setMethod("sea");
  resetOutput("sea");
  setRunState("idle");
  checkServer();
}

init();
