// comeapi's dashboard: polls dashboard/data once a second and draws it. Every value from
// the gateway goes into the page as text (textContent), never as markup.
"use strict";

(() => {
  const KEY = "comeapi.dashboard.key";
  const POLL_MS = 1000;
  const ROWS = 50;
  let previous = null; // the last snapshot, for rates
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (className) td.className = className;
    return td;
  }

  function badge(text, className) {
    const span = document.createElement("span");
    span.className = "badge " + className;
    span.textContent = text;
    return span;
  }

  // --- formatting ------------------------------------------------------------------------

  function ms(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return value.toFixed(2) + " ms";
    if (value < 1000) return value.toFixed(value < 10 ? 1 : 0) + " ms";
    return (value / 1000).toFixed(2) + " s";
  }

  function clock(epoch) {
    const d = new Date(epoch * 1000);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function rate(now, before, key) {
    if (!before) return null;
    const dt = now.time - before.time;
    return dt > 0 ? (key(now) - key(before)) / dt : null;
  }

  function number(value, digits = 1) {
    return value === null ? "–" : value.toFixed(digits);
  }

  function statusClass(status) {
    if (status >= 500) return "num bad";
    if (status >= 400) return "num warn";
    return "num ok";
  }

  // --- drawing ---------------------------------------------------------------------------

  function render(data) {
    const pool = data.pool;
    const down = data.backends.filter((b) => !b.healthy).length;
    $("state").className = "state" + (pool.healthy_backends === 0 && pool.total_backends ? " bad" : "");
    $("state").textContent =
      `updated ${clock(data.time)} · up ${ago(data.time - data.started).replace(" ago", "")}` +
      ` · access log ${data.access_log}`;
    $("healthy").textContent = `${pool.healthy_backends} / ${pool.total_backends}`;
    const healthClass = down ? (pool.healthy_backends ? "warn" : "bad") : "ok";
    $("healthy").className = "value " + (pool.total_backends ? healthClass : "");
    $("routing").textContent = data.routing;
    $("slots").textContent = `${pool.in_flight} / ${pool.capacity}`;
    $("slots-note").textContent = "in flight / capacity";
    const queue = data.queue;
    $("queue").textContent = `${queue.depth} / ${queue.limit}`;
    $("queue-bar").style.width = (queue.limit ? Math.min(100, (100 * queue.depth) / queue.limit) : 0) + "%";
    $("queue-bar").parentElement.classList.toggle("full", queue.limit > 0 && queue.depth >= queue.limit);

    const cache = data.cache;
    if (cache) {
      $("hit-ratio").textContent = cache.hit_ratio === null ? "–" : (100 * cache.hit_ratio).toFixed(1) + " %";
      $("hits-misses").textContent = `${cache.hits} hits · ${cache.misses} misses`;
    } else {
      $("hit-ratio").textContent = "no cache";
      $("hits-misses").textContent = "";
    }
    const rps = rate(data, previous, (d) => d.requests.total);
    $("rps").textContent = number(rps);
    $("requests-total").textContent = `${data.requests.total} since start`;
    const tps = rate(data, previous, (d) => d.tokens_generated);
    $("tps").textContent = number(tps);
    $("tokens-total").textContent = `${data.tokens_generated} tokens since start`;

    renderBackends(data);
    renderCache(cache);
    renderRequests(data.requests);
    previous = data;
  }

  function renderBackends(data) {
    const rows = data.backends.map((b) => {
      const tr = document.createElement("tr");
      tr.dataset.url = b.url;
      tr.dataset.healthy = String(b.healthy);
      tr.append(cell(b.url));
      tr.append(cell(b.healthy ? "healthy" : "down: " + (b.reason || "unknown"), b.healthy ? "ok" : "bad"));
      const slots = document.createElement("td");
      const wrap = document.createElement("span");
      wrap.className = "slots";
      const bar = document.createElement("span");
      bar.className = "bar" + (b.in_flight >= b.capacity ? " full" : "");
      const fill = document.createElement("span");
      fill.style.width = Math.min(100, (100 * b.in_flight) / Math.max(1, b.capacity)) + "%";
      bar.append(fill);
      const text = document.createElement("span");
      text.className = "slots-text";
      text.textContent = `${b.in_flight} / ${b.capacity}`;
      wrap.append(bar, text);
      slots.append(wrap);
      tr.append(slots);
      tr.append(cell(b.served, "num"));
      tr.append(cell(b.latency_ms === null ? null : ms(b.latency_ms), "num"));
      tr.append(cell(b.failures, "num" + (b.failures ? " warn" : "")));
      tr.append(cell(b.restarts === undefined ? null : b.restarts, "num"));
      tr.append(cell(b.last_check ? ago(data.time - b.last_check) : "never"));
      tr.append(cell((b.loaded_models.length ? b.loaded_models : b.models).join(", "), "wide"));
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell("No backends: this gateway serves its cache only.", "note");
      td.colSpan = 9;
      tr.append(td);
      rows.push(tr);
    }
    $("backends").tBodies[0].replaceChildren(...rows);
    const onDemand = data.on_demand;
    $("on-demand").hidden = !onDemand;
    if (onDemand) $("on-demand").textContent = "on demand: " + JSON.stringify(onDemand);
  }

  function renderCache(cache) {
    const table = $("cache-hits");
    if (!cache) {
      $("cache-note").textContent = "This gateway runs without a response cache.";
      table.tHead.replaceChildren();
      table.tBodies[0].replaceChildren();
      return;
    }
    const variants = cache.variants_per_prompt;
    const shown = cache.prompts_shown;
    $("cache-note").textContent =
      `${cache.prompts} prompts, ${cache.answers} answers (${variants} variants each)` +
      (shown.length < cache.prompts ? `; the ${shown.length} most hit shown` : "");
    const head = document.createElement("tr");
    head.append(th("Prompt"), th("Model", "wide"));
    for (let v = 0; v < variants; v++) head.append(th("v" + v, "num"));
    head.append(th("Total", "num"));
    table.tHead.replaceChildren(head);
    const rows = shown.map((p) => {
      const tr = document.createElement("tr");
      tr.dataset.key = p.key;
      const prompt = cell(p.prompt, "prompt");
      prompt.title = p.prompt;
      tr.append(prompt, cell(p.model, "wide"));
      for (let v = 0; v < variants; v++) {
        const hits = p.hits_by_variant[String(v)];
        const td = cell(hits === undefined ? "·" : hits, "num" + (hits ? "" : " zero"));
        td.dataset.variant = String(v);
        tr.append(td);
      }
      tr.append(cell(p.hits, "num total"));
      return tr;
    });
    table.tBodies[0].replaceChildren(...rows);
  }

  function th(text, className) {
    const el = document.createElement("th");
    el.textContent = text;
    if (className) el.className = className;
    return el;
  }

  function renderRequests(requests) {
    $("requests-note").textContent =
      `The last ${requests.recent.length} of ${requests.total} (the gateway keeps ${requests.kept}; ` +
      "this page's own polling is not listed).";
    const rows = requests.recent.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.cache = r.cache || "";
      tr.dataset.status = String(r.status);
      tr.dataset.path = r.path;
      tr.append(cell(clock(r.time)));
      const path = cell(`${r.method} ${r.path}`, "path");
      path.title = r.client ? `from ${r.client}` : "";
      tr.append(path);
      tr.append(cell(r.model));
      tr.append(cell(r.status, statusClass(r.status)));
      const cache = document.createElement("td");
      if (r.cache) cache.append(badge(r.cache, r.cache));
      else cache.textContent = "–";
      tr.append(cache);
      tr.append(cell(r.variant, "num variant"));
      tr.append(cell(r.backend));
      tr.append(cell(ms(r.duration_ms), "num"));
      const tokens =
        r.prompt_tokens === null && r.completion_tokens === null
          ? null
          : `${r.prompt_tokens ?? "?"} → ${r.completion_tokens ?? "?"}`;
      tr.append(cell(tokens, "num"));
      const speed =
        r.backend && r.completion_tokens && r.duration_ms > 0
          ? ((1000 * r.completion_tokens) / r.duration_ms).toFixed(1)
          : null;
      tr.append(cell(speed, "num"));
      return tr;
    });
    $("requests").tBodies[0].replaceChildren(...rows);
  }

  // --- the key, and polling --------------------------------------------------------------

  function askKey(problem) {
    sessionStorage.removeItem(KEY);
    $("main").hidden = true;
    $("forget").hidden = true;
    $("key-form").hidden = false;
    $("key-error").hidden = !problem;
    $("key-error").textContent = problem || "";
    $("state").textContent = "API key needed";
    $("key").focus();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    const headers = key ? { Authorization: "Bearer " + key } : {};
    let response;
    try {
      response = await fetch(`dashboard/data?rows=${ROWS}`, { headers, cache: "no-store" });
    } catch (err) {
      $("state").textContent = "gateway unreachable; retrying";
      $("state").className = "state bad";
      schedule();
      return;
    }
    if (response.status === 401) {
      askKey(key ? "That key was refused." : null);
      return;
    }
    if (!response.ok) {
      $("state").textContent = `the gateway answered ${response.status}; retrying`;
      $("state").className = "state bad";
      schedule();
      return;
    }
    const data = await response.json();
    $("key-form").hidden = true;
    $("main").hidden = false;
    $("forget").hidden = !key;
    render(data);
    schedule();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    $("key-form").hidden = true;
    $("state").textContent = "connecting…";
    poll();
  });

  $("forget").addEventListener("click", () => {
    clearTimeout(timer);
    previous = null;
    askKey(null);
  });

  poll();
})();
