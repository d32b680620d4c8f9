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
    renderMisses(cache);
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
      (shown.length < cache.prompts ? `; the ${shown.length} most hit shown` : "") +
      (cache.match === "similar" ? `; matching by meaning: ${cache.similar_hits} similar hits` +
        (cache.similar && cache.similar.problem ? ` (${cache.similar.problem})` : "") : "");
    const head = document.createElement("tr");
    head.append(th("Prompt"), th("Model", "wide"));
    for (let v = 0; v < variants; v++) head.append(th("v" + v, "num"));
    head.append(th("Total", "num"));
    if (cache.match === "similar") head.append(th("Paraphrases"));
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
      if (p.similar) {
        // Whether paraphrases get this prompt's answers (its false-hit bound within the
        // setting), or why it stays exact-only.
        const s = p.similar;
        const text = s.similar
          ? `yes (${Math.round(100 * s.served_share)} % of same:, bound ${(100 * s.false_hit_bound).toFixed(2)} %)`
          : `exact-only: ${s.reason}`;
        tr.append(cell(text, "similar"));
      }
      return tr;
    });
    table.tBodies[0].replaceChildren(...rows);
  }

  function renderMisses(cache) {
    // The queries missed most often (this gateway process), with the nearest known prompt
    // and why they were not answered as it: what to label next (`comeapi cache label`).
    const missed = cache ? cache.missed || [] : [];
    $("misses-note").textContent = !cache
      ? "This gateway runs without a response cache."
      : `${cache.missed_tracked} distinct missed queries counted by this process` +
        (cache.match === "similar" ? "" : " (the nearest prompt is shown with --match similar)");
    const rows = missed.map((m) => {
      const tr = document.createElement("tr");
      const query = cell(m.query, "prompt");
      query.title = m.query;
      tr.append(query, cell(m.kind), cell(m.count, "num"), cell(m.nearest_prompt, "prompt"));
      tr.append(cell(m.score === null ? null : m.score.toFixed(3), "num"), cell(m.reason));
      return tr;
    });
    $("missed").tBodies[0].replaceChildren(...rows);
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
      if (r.cache) cache.append(badge(r.match === "similar" ? "HIT ≈" : r.cache, r.cache));
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

  // --- review: every answer, its state and the buttons that change it --------------------

  const REVIEW_MS = 10000;
  let reviewTimer = null;
  let reviewAnswers = null; // the last list from cache/answers
  let reviewText = null; // ... as it came, to tell whether it changed
  let reviewBusy = false; // a change in flight or an editor open: no reload under the user

  function authHeaders(extra) {
    const key = sessionStorage.getItem(KEY);
    return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
  }

  function reviewStatus(text, bad) {
    $("review-status").textContent = text;
    $("review-status").className = "note" + (bad ? " bad" : "");
  }

  function scheduleReview() {
    clearTimeout(reviewTimer);
    reviewTimer = setTimeout(loadReview, REVIEW_MS);
  }

  async function loadReview() {
    if (reviewBusy) {
      scheduleReview();
      return;
    }
    let response;
    try {
      response = await fetch("cache/answers", { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      reviewStatus("could not load the answers; retrying", true);
      scheduleReview();
      return;
    }
    if (response.status === 401) return; // the data poll asks for the key
    if (response.status === 404) {
      $("review-note").textContent = "This gateway runs without a response cache.";
      $("review-prompts").replaceChildren();
      return;
    }
    if (!response.ok) {
      reviewStatus(`the gateway answered ${response.status}; retrying`, true);
      scheduleReview();
      return;
    }
    const text = await response.text();
    if (reviewBusy) {
      // An editor opened, or a change started, while this was loading: not under them.
      scheduleReview();
      return;
    }
    if (text !== reviewText) {
      // Redrawn only when something changed: a button under the pointer stays where it is.
      reviewText = text;
      reviewAnswers = JSON.parse(text);
      renderReview();
    }
    scheduleReview();
  }

  function shown(answer, filter) {
    if (filter === "all") return true;
    if (filter === "flagged") return answer.flags.length > 0;
    return answer.state === filter;
  }

  function renderReview() {
    const data = reviewAnswers;
    if (!data) return;
    const filter = $("review-filter").value;
    const groups = new Map();
    for (const a of data.answers) {
      if (!groups.has(a.key)) groups.set(a.key, []);
      groups.get(a.key).push(a);
    }
    const served = data.answers.filter((a) => a.served).length;
    const count = (state) => data.answers.filter((a) => a.state === state).length;
    $("review-note").textContent =
      `${data.answers.length} answers of ${groups.size} prompts: ${count("approved")} approved, ` +
      `${count("pending")} pending, ${count("rejected")} rejected; ${served} served ` +
      `(serve_states ${data.serve_states.join(",")}). A rejected answer is never served; while ` +
      "a prompt has a served pinned answer, only pinned ones are.";
    const blocks = [];
    for (const [key, answers] of groups) {
      const visible = answers.filter((a) => shown(a, filter));
      if (visible.length) blocks.push(promptBlock(key, answers, visible));
    }
    if (!blocks.length) {
      const p = document.createElement("p");
      p.className = "note";
      p.textContent = "No answer matches this filter.";
      blocks.push(p);
    }
    $("review-prompts").replaceChildren(...blocks);
  }

  function button(label, action, key, variant) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.action = action;
    b.dataset.key = key;
    if (variant !== undefined) b.dataset.variant = String(variant);
    return b;
  }

  function promptBlock(key, answers, visible) {
    const first = answers[0];
    const block = document.createElement("div");
    block.className = "review-prompt";
    block.dataset.key = key;
    const head = document.createElement("div");
    head.className = "review-head";
    const title = document.createElement("h3");
    title.textContent = first.prompt;
    const meta = document.createElement("small");
    const served = answers.filter((a) => a.served).length;
    const system = (first.messages || []).find((m) => m[0] === "system" || m[0] === "developer");
    meta.textContent =
      `${first.kind} · ${first.model} · ${key.slice(0, 12)} · ${served} of ${answers.length} served` +
      (system ? ` · system: ${system[1]}` : "");
    const actions = document.createElement("span");
    actions.className = "actions";
    actions.append(button("Approve all", "approve", key), button("Reject all", "reject", key));
    head.append(title, actions, meta);
    const table = document.createElement("table");
    const thead = document.createElement("thead");
    const hr = document.createElement("tr");
    for (const [text, cls] of [["v", "num"], ["State", ""], ["Flags", ""], ["Served", ""], ["Tokens", "num"], ["Answer", "answer"], ["", ""]]) {
      hr.append(th(text, cls));
    }
    thead.append(hr);
    const tbody = document.createElement("tbody");
    for (const a of visible) tbody.append(answerRow(a));
    table.append(thead, tbody);
    const scroll = document.createElement("div");
    scroll.className = "scroll";
    scroll.append(table);
    block.append(head, scroll);
    return block;
  }

  function answerRow(a) {
    const tr = document.createElement("tr");
    tr.className = "answer-row";
    tr.dataset.key = a.key;
    tr.dataset.variant = String(a.variant);
    tr.dataset.state = a.state;
    tr.dataset.served = String(a.served);
    tr.append(cell(a.variant, "num"));
    const state = document.createElement("td");
    state.className = "state-cell";
    state.append(badge(a.state, a.state));
    if (a.pinned) state.append(" ", badge("pinned", "pinned"));
    if (a.edited) state.append(" ", badge("edited", "edited"));
    tr.append(state);
    const flags = document.createElement("td");
    flags.className = "flags";
    for (const f of a.flags) flags.append(badge(f, "flag"), " ");
    if (!a.flags.length) flags.textContent = "–";
    tr.append(flags);
    tr.append(cell(a.served ? "yes" : "no", a.served ? "ok" : "muted"));
    tr.append(cell(a.completion_tokens, "num"));
    const text = document.createElement("td");
    text.className = "answer";
    const body = document.createElement("div");
    body.className = "answer-text";
    body.textContent = a.text;
    text.append(body);
    if (a.history.length) {
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = `history (${a.history.length})`;
      details.append(summary);
      for (const h of a.history) {
        const old = document.createElement("div");
        old.className = "answer-text old";
        old.textContent = `${h.why}: ${h.answer}`;
        details.append(old);
      }
      text.append(details);
    }
    tr.append(text);
    const actions = document.createElement("td");
    actions.className = "actions";
    actions.append(
      button("Approve", "approve", a.key, a.variant),
      button("Reject", "reject", a.key, a.variant),
      a.pinned ? button("Unpin", "unpin", a.key, a.variant) : button("Pin", "pin", a.key, a.variant),
      button("Regenerate", "regenerate", a.key, a.variant),
      button("Edit", "edit", a.key, a.variant),
    );
    tr.append(actions);
    return tr;
  }

  function openEditor(row, key, variant) {
    const answer = reviewAnswers.answers.find((a) => a.key === key && a.variant === variant);
    const td = row.querySelector("td.answer");
    const area = document.createElement("textarea");
    area.className = "editor";
    area.value = answer ? answer.text : "";
    area.rows = Math.min(12, Math.max(3, area.value.split("\n").length + 1));
    const save = button("Save", "save", key, variant);
    const cancel = button("Cancel", "cancel", key, variant);
    const bar = document.createElement("div");
    bar.className = "editor-bar";
    bar.append(save, cancel);
    td.replaceChildren(area, bar);
    reviewBusy = true;
    area.focus();
  }

  async function act(key, variant, action, text) {
    const path = `cache/answers/${encodeURIComponent(key)}` + (variant === undefined ? "" : `/${variant}`);
    const body = text === undefined ? { action } : { action, text };
    reviewBusy = true;
    reviewStatus(`${action}…`, false);
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
      });
    } catch (err) {
      reviewBusy = false;
      reviewStatus(`${action} failed: the gateway is unreachable`, true);
      return;
    }
    reviewBusy = false;
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const message = data && data.error ? data.error.message : `HTTP ${response.status}`;
      reviewStatus(`${action} failed: ${message}`, true);
      renderReview();
      return;
    }
    const changed = data.answers.map((a) => a.variant).join(", ");
    reviewStatus(`${action}: variant ${changed} of ${data.answers[0].prompt}`, false);
    await loadReview();
  }

  $("review-prompts").addEventListener("click", (event) => {
    const b = event.target.closest("button[data-action]");
    if (!b) return;
    const key = b.dataset.key;
    const variant = b.dataset.variant === undefined ? undefined : Number(b.dataset.variant);
    const action = b.dataset.action;
    if (action === "edit") {
      openEditor(b.closest("tr"), key, variant);
    } else if (action === "cancel") {
      reviewBusy = false;
      renderReview();
    } else if (action === "save") {
      const text = b.closest("td").querySelector("textarea").value;
      act(key, variant, "edit", text);
    } else {
      for (const other of b.closest(".review-prompt").querySelectorAll("button")) other.disabled = true;
      act(key, variant, action);
    }
  });
  $("review-filter").addEventListener("change", renderReview);
  $("review-reload").addEventListener("click", () => {
    reviewBusy = false;
    loadReview();
  });

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
    const first = $("main").hidden;
    $("main").hidden = false;
    $("forget").hidden = !key;
    render(data);
    if (first) loadReview(); // the key works: load the answers too
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
    clearTimeout(reviewTimer);
    reviewAnswers = reviewText = null;
    previous = null;
    askKey(null);
  });

  poll();
})();
