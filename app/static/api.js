// The job API from the browser: POST /jobs, then the job's Server-Sent Events read with fetch() and a stream
// parser (EventSource cannot send the Authorization header that an API key needs).

export const endpoint = (path) => new URL(path, document.baseURI).href;

// fetch(), with a failed connection (the browser's own "Failed to fetch" TypeError) as an error that says so.
async function request(url, init) {
  try {
    return await fetch(url, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw Object.assign(new Error("cannot reach the server (the connection failed, or the server stopped)."), { unreachable: true });
  }
}

export class Api {
  // apiKey: a function returning the key to send ("" for none).
  constructor(apiKey) {
    this.apiKey = apiKey;
  }

  headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = this.apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The job's {id, status, location}; throws an Error with the server's message on a 4xx/5xx.
  async submitJob(body, signal) {
    const response = await request(endpoint("jobs"), { method: "POST", headers: this.headers(true), body: JSON.stringify(body), signal });
    if (!response.ok) throw await apiError(response);
    return response.json();
  }

  // Follows a job's events, calling onStep for each `step`; returns the job JSON ({id, status, error, result}).
  // A stream cut off while the job is queued or running is opened again (the server replays the past events), at
  // most `retries` times.
  async followJob(id, signal, onStep, retries = 5) {
    for (let attempt = 1; ; attempt++) {
      let job = null;
      try {
        const response = await request(endpoint(`jobs/${encodeURIComponent(id)}/events`), { headers: this.headers(false), signal });
        if (!response.ok) throw await apiError(response);
        await readEventStream(response, (name, data) => {
          if (name === "step" && onStep) {
            try {
              onStep(parseData(data));
            } catch (error) {
              error.fromPage = true; // the page's own bug, not a dropped connection: no reconnecting
              throw error;
            }
          } else if (name === "result") job = parseData(data);
        });
        job ||= await this.getJob(id, signal); // the stream ended without the result
      } catch (error) {
        if (error.name === "AbortError" || error.status || error.fromPage || attempt > retries) throw error; // not a dropped connection, or no retries left
      }
      if (job && job.status !== "queued" && job.status !== "running") return job;
      if (attempt > retries) throw new Error(`lost the job's event stream ${attempt} times; ${id} is still ${job.status}`);
      await pause(500 * attempt, signal);
    }
  }

  // The job JSON of GET /jobs/{id}.
  async getJob(id, signal) {
    const response = await request(endpoint(`jobs/${encodeURIComponent(id)}`), { headers: this.headers(false), signal });
    if (!response.ok) throw await apiError(response);
    return response.json();
  }

  async cancelJob(id) {
    const response = await request(endpoint(`jobs/${encodeURIComponent(id)}`), { method: "DELETE", headers: this.headers(false) });
    if (!response.ok) throw await apiError(response);
    return response.json();
  }

  // [ok, body] of the public readiness probe.
  async ready() {
    const response = await fetch(endpoint("ready"));
    return [response.ok, await response.json()];
  }
}

export async function apiError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${body.error.message} (HTTP ${response.status})`;
  } catch (_) { /* not JSON: keep the status */ }
  if (response.status === 401) message += ". Set the API key field.";
  const retry = response.headers.get("Retry-After");
  if (retry && (response.status === 429 || response.status === 503)) message += `. Retry in ${retry} s.`;
  const error = new Error(message);
  error.status = response.status;
  return error;
}

// Resolves after `ms` milliseconds; rejects with the AbortError when `signal` aborts first.
export function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const aborted = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", aborted);
      resolve();
    }, ms);
    signal?.addEventListener("abort", aborted, { once: true });
  });
}

export function parseData(data) {
  try {
    return JSON.parse(data);
  } catch (_) {
    // Python's json writes NaN/Infinity for non-finite floats, which JSON.parse refuses.
    return JSON.parse(data.replace(/-?\bInfinity\b|\bNaN\b/g, "null"));
  }
}

// Calls onEvent(name, data) for each Server-Sent Event of a fetch() response (WHATWG event-stream format).
export async function readEventStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let name = "message";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onEvent(name, data.join("\n"));
      name = "message";
      data = [];
      return;
    }
    if (text.startsWith(":")) return; // a comment (keep-alive ping)
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    for (;;) {
      const at = buffer.search(/[\r\n]/);
      if (at < 0) break;
      if (buffer[at] === "\r" && at === buffer.length - 1 && !done) break; // maybe half of "\r\n"
      const width = buffer[at] === "\r" && buffer[at + 1] === "\n" ? 2 : 1;
      line(buffer.slice(0, at));
      buffer = buffer.slice(at + width);
    }
    if (done) break;
  }
  if (buffer) line(buffer);
  line("");
}
