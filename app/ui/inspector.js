// The tiermem inspector: plain DOM, no build step, no dependencies.
//
// Everything it shows comes from tiermem's own JSON API, called with the API key
// typed into the page. The key is kept in sessionStorage: this tab only, gone
// when the tab closes, never in a cookie (so no other page can make the browser
// send it). Stored text (what users and the model said) is only ever set as
// textContent, never parsed as HTML.
"use strict";

const KEY_SLOT = "tiermem.apiKey";
const SVG = "http://www.w3.org/2000/svg";
const TURN_PAGE = 100;

const ui = {
  key: sessionStorage.getItem(KEY_SLOT),  // null: not connected
  userFilter: "",
  cursor: null,
  session: null,       // the session shown
  turns: [],           // its turns loaded so far, oldest first
  nextBefore: null,
  confirmAction: null,
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, params) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
  }
  const headers = { Accept: "application/json" };
  if (ui.key) headers.Authorization = `Bearer ${ui.key}`;
  let r;
  try {
    r = await fetch(url, { method, headers, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "unreachable", `tiermem did not answer (${e.message})`);
  }
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const err = (body && body.error) || {};
    throw new ApiError(r.status, err.code || "http_" + r.status,
                       err.message || `${method} ${url.pathname}: HTTP ${r.status}`);
  }
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function clip(text, n) {
  const s = String(text || "");
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function notice(text, kind) {
  const n = $("notice");
  n.textContent = text;
  n.className = kind || "info";
  n.hidden = false;
}

function failed(e) {
  notice(e.status === 401 || e.status === 403
    ? `${e.message} (check the API key)` : e.message, "error");
  if (e.status === 401) setStatus("Not connected: the key was refused.");
}

function setStatus(text) {
  $("status").textContent = text;
}

// --- the key ------------------------------------------------------------------

async function connect(key) {
  ui.key = key;
  try {
    await loadSessions(true);
  } catch (e) {
    ui.key = null;
    sessionStorage.removeItem(KEY_SLOT);
    failed(e);
    return;
  }
  sessionStorage.setItem(KEY_SLOT, key);
  $("notice").hidden = true;
  setStatus(key ? "Connected (key kept in this tab only)." : "Connected (no key: auth is off).");
  document.body.classList.add("connected");
}

function disconnect() {
  ui.key = null;
  sessionStorage.removeItem(KEY_SLOT);
  $("key").value = "";
  $("sessions").replaceChildren();
  $("session-pane").hidden = true;
  $("search-results").replaceChildren();
  document.body.classList.remove("connected");
  setStatus("Not connected. The key stays in this tab only.");
}

// --- sessions -----------------------------------------------------------------

async function loadSessions(fresh) {
  if (fresh) ui.cursor = null;
  const page = await api("GET", "/v1/sessions",
                         { user_id: ui.userFilter, cursor: ui.cursor, limit: 50 });
  const list = $("sessions");
  if (fresh) list.replaceChildren();
  for (const s of page.sessions) {
    const button = el("button", { type: "button", class: "session", "data-session-id": s.session_id },
                      el("span", { class: "sid", text: s.session_id }),
                      el("span", { class: "when", text: when(s.created_at) }));
    button.addEventListener("click", () => openSession(s.session_id).catch(failed));
    list.append(el("li", {}, button));
  }
  if (fresh && !page.sessions.length) {
    list.append(el("li", { class: "empty", text: "No sessions." }));
  }
  ui.cursor = page.next_cursor;
  $("more-sessions").hidden = !page.next_cursor;
}

async function openSession(sessionId) {
  const [meta, history] = await Promise.all([
    api("GET", `/v1/sessions/${encodeURIComponent(sessionId)}`),
    api("GET", `/v1/sessions/${encodeURIComponent(sessionId)}/turns`, { limit: TURN_PAGE }),
  ]);
  ui.session = meta;
  ui.turns = history.turns.slice().reverse();
  ui.nextBefore = history.next_before;
  for (const b of document.querySelectorAll("#sessions .session")) {
    b.classList.toggle("open", b.dataset.sessionId === sessionId);
  }
  if (meta.user_id) $("search-user").value = meta.user_id;
  renderSession(history.in_l1);
}

async function olderTurns() {
  const s = ui.session;
  const history = await api("GET", `/v1/sessions/${encodeURIComponent(s.session_id)}/turns`,
                            { before: ui.nextBefore, limit: TURN_PAGE });
  ui.turns = history.turns.slice().reverse().concat(ui.turns);
  ui.nextBefore = history.next_before;
  renderSession(history.in_l1);
}

function renderSession(inL1) {
  const s = ui.session;
  $("session-pane").hidden = false;
  $("session-title").textContent = `Session ${s.session_id}`;
  const facts = [
    ["user", s.user_id],
    ["turns", s.turn_count],
    ["archived to L3 up to turn", s.archived_upto],
    ["unarchived (L2 only)", s.unarchived_count],
    ["context starts at turn", s.context_start],
    ["prefix version", s.prefix_version],
    ["in L1 of this pod", inL1 ? "yes" : "no"],
    ["created", when(s.created_at)],
    ["updated", when(s.updated_at)],
  ];
  $("session-meta").replaceChildren(
    ...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v ?? "") })]));
  if (s.running_summary) {
    $("session-meta").append(el("dt", { text: "running summary" }),
                             el("dd", { class: "summary", text: s.running_summary }));
  }
  renderChart(ui.turns);
  renderBreaks(ui.turns);
  renderTurns(ui.turns);
  $("older-turns").hidden = !ui.nextBefore;
}

// --- the chart: prompt, cached and expected-cacheable tokens per turn ---------

function renderChart(turns) {
  const chart = $("token-chart");
  chart.replaceChildren();
  const measured = turns.filter((t) => t.usage && t.usage.prompt_tokens);
  if (!measured.length) {
    chart.setAttribute("viewBox", "0 0 600 40");
    const note = svg("text", { x: 8, y: 24, class: "none" });
    note.textContent = "No token figures: these turns were rebuilt from L3.";
    chart.append(note);
    return;
  }
  const top = Math.max(...measured.map((t) => t.usage.prompt_tokens));
  const bar = 18, gap = 6, h = 160, left = 44, base = h + 10;
  const width = left + turns.length * (bar + gap) + 10;
  chart.setAttribute("viewBox", `0 0 ${width} ${h + 34}`);
  chart.setAttribute("width", String(width));
  const y = (v) => base - (v / top) * h;
  chart.append(svg("line", { x1: left - 4, x2: width, y1: base, y2: base, class: "axis" }));
  for (const v of [0, top]) {
    const label = svg("text", { x: left - 8, y: y(v) + 4, class: "tick", "text-anchor": "end" });
    label.textContent = String(v);
    chart.append(label);
  }
  turns.forEach((t, i) => {
    const x = left + i * (bar + gap);
    const label = svg("text", { x: x + bar / 2, y: base + 16, class: "tick", "text-anchor": "middle" });
    label.textContent = String(t.turn);
    chart.append(label);
    const u = t.usage;
    if (!u || !u.prompt_tokens) return;
    const g = svg("g", { class: "turn-bar", "data-turn": t.turn });
    const title = svg("title", {});
    title.textContent = `turn ${t.turn}: ${u.cached_tokens ?? "?"} cached of ${u.prompt_tokens} ` +
      `prompt tokens, ${u.expected_cacheable_tokens ?? "?"} expected cacheable` +
      (u.prefix_break ? `; prefix break: ${u.prefix_break}` : "");
    g.append(title);
    g.append(svg("rect", { x, y: y(u.prompt_tokens), width: bar, height: base - y(u.prompt_tokens), class: "bar-prompt" }));
    if (u.cached_tokens) {
      g.append(svg("rect", { x, y: y(u.cached_tokens), width: bar, height: base - y(u.cached_tokens), class: "bar-cached" }));
    }
    if (u.expected_cacheable_tokens !== undefined && u.expected_cacheable_tokens !== null) {
      const ey = y(u.expected_cacheable_tokens);
      g.append(svg("line", { x1: x - 2, x2: x + bar + 2, y1: ey, y2: ey, class: "expected" }));
    }
    if (u.prefix_break) {
      g.append(svg("path", { d: `M${x + bar / 2 - 5},6 h10 l-5,8 z`, class: "break-mark" }));
    }
    chart.append(g);
  });
}

function renderBreaks(turns) {
  const list = $("breaks");
  list.replaceChildren();
  for (const t of turns) {
    const reason = t.usage && t.usage.prefix_break;
    if (!reason) continue;
    list.append(el("li", { class: "break", "data-turn": t.turn },
      el("strong", { text: `turn ${t.turn}` }), ` ${reason}: `,
      el("span", { text: `${t.usage.expected_cacheable_tokens ?? 0} of ${t.usage.prompt_tokens} prompt tokens could be reused` })));
  }
  if (!list.children.length) list.append(el("li", { class: "empty", text: "None: every measured turn extended the previous prompt." }));
}

// --- the turns ------------------------------------------------------------------

function toolCallsOf(t) {
  // The committed log (id, name, ok) where the turn has one; else the calls
  // its messages name (a turn rebuilt from L3).
  if (t.usage && t.usage.tool_calls) return t.usage.tool_calls;
  const calls = [];
  for (const m of t.messages || []) {
    for (const c of m.tool_calls || []) calls.push({ name: (c.function || {}).name || c.name, ok: null });
  }
  return calls;
}

function userText(t) {
  const m = (t.messages || []).find((x) => x.role === "user");
  return m ? m.content : "";
}

function replyText(t) {
  return (t.messages || []).filter((x) => x.role === "assistant" && x.content)
    .map((x) => x.content).join("\n");
}

function renderTurns(turns) {
  const body = $("turns").tBodies[0];
  body.replaceChildren();
  for (const t of turns.slice().reverse()) {
    const tiers = el("td", { class: "tiers" });
    for (const tier of ["l1", "l2", "l3"]) {
      const on = t.tiers && t.tiers[tier];
      tiers.append(el("span", { class: `tier ${tier} ${on ? "on" : "off"}`, text: tier.toUpperCase(),
                                title: on ? `held in ${tier.toUpperCase()}` : `not in ${tier.toUpperCase()}` }));
    }
    const tools = el("td", { class: "tools" });
    for (const c of toolCallsOf(t)) {
      tools.append(el("span", { class: `call ${c.ok === false ? "failed" : "ok"}`,
                                text: c.name + (c.ok === false ? " ✗" : "") }));
    }
    const skills = el("td", { class: "skills" });
    for (const s of t.skills || []) {
      skills.append(el("span", { class: "skill", text: `${s.name} (${s.how})`, title: `version ${s.version}` }));
    }
    const u = t.usage || {};
    const tokens = u.prompt_tokens ? `${u.cached_tokens ?? "?"} / ${u.prompt_tokens}` : "";
    const hits = (t.memory_hits || []).length;
    const user = el("td", { class: "user", text: clip(userText(t), 400), title: userText(t) });
    if (hits) user.append(el("span", { class: "hits", text: ` (+${hits} memor${hits === 1 ? "y" : "ies"})` }));
    body.append(el("tr", { class: `turn status-${t.status || t.source}`, "data-turn": t.turn },
      el("td", { class: "n", text: String(t.turn) }),
      tiers,
      el("td", { class: "status", text: t.source === "missing" ? "missing" : (t.status || (t.complete ? "archived" : "partial")) }),
      user,
      el("td", { class: "reply", text: clip(replyText(t), 400), title: replyText(t) }),
      tools,
      skills,
      el("td", { class: "tokens", text: tokens })));
  }
}

// --- memory search and forgetting ----------------------------------------------

async function search() {
  const user = $("search-user").value.trim();
  const query = $("search-query").value.trim();
  const found = await api("GET", `/v1/users/${encodeURIComponent(user)}/memories`, { query, k: 10 });
  const list = $("search-results");
  list.replaceChildren();
  for (const m of found.memories) {
    const open = el("button", { type: "button", class: "link", text: `${m.session_id} · turns ${m.first_turn}–${m.last_turn}` });
    open.addEventListener("click", () => openSession(m.session_id).catch(failed));
    const matches = el("ul", { class: "matches" });
    for (const x of m.matches || []) matches.append(el("li", { text: `turn ${x.turn}: ${clip(x.text, 300)}` }));
    list.append(el("li", { class: "hit" }, open, el("span", { class: "score", text: ` score ${m.score.toFixed(3)}` }),
                   m.matches && m.matches.length ? matches : el("p", { text: clip(m.text, 300) })));
  }
  if (!found.memories.length) list.append(el("li", { class: "empty", text: `Nothing found for ${user}.` }));
}

function confirmThen(text, action) {
  $("confirm-text").textContent = text;
  ui.confirmAction = action;
  $("confirm").hidden = false;
  $("confirm-no").focus();
}

function closeConfirm() {
  $("confirm").hidden = true;
  ui.confirmAction = null;
}

function describeRemoved(what, removed) {
  const parts = Object.entries(removed).map(([k, v]) =>
    `${Array.isArray(v) ? v.length : v} ${k.replace(/_/g, " ")}`);
  return `Forgot ${what}: removed ${parts.join(", ")}.`;
}

async function forgetSession() {
  const sid = ui.session.session_id;
  const r = await api("DELETE", `/v1/sessions/${encodeURIComponent(sid)}`);
  notice(describeRemoved(`session ${sid}`, r.removed), "info");
  $("session-pane").hidden = true;
  ui.session = null;
  await loadSessions(true);
}

async function forgetUser(entirely) {
  const user = $("search-user").value.trim();
  const path = entirely ? `/v1/users/${encodeURIComponent(user)}` : `/v1/users/${encodeURIComponent(user)}/memories`;
  const r = await api("DELETE", path);
  notice(describeRemoved(entirely ? `user ${user}` : `the memories of ${user}`, r.removed), "info");
  $("search-results").replaceChildren();
  if (entirely) {
    $("session-pane").hidden = true;
    await loadSessions(true);
  }
}

// --- wiring ---------------------------------------------------------------------

function wire() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect($("key").value.trim());
  });
  $("disconnect").addEventListener("click", disconnect);
  $("filter-form").addEventListener("submit", (e) => {
    e.preventDefault();
    ui.userFilter = $("user-filter").value.trim();
    loadSessions(true).catch(failed);
  });
  $("more-sessions").addEventListener("click", () => loadSessions(false).catch(failed));
  $("older-turns").addEventListener("click", () => olderTurns().catch(failed));
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search().catch(failed);
  });
  $("forget-session").addEventListener("click", () => confirmThen(
    `Forget session ${ui.session.session_id}? Its turns, its checkpoint and its archived memories are deleted on every tier. This cannot be undone.`,
    forgetSession));
  const needUser = (fn) => () => {
    const user = $("search-user").value.trim();
    if (!user) return notice("Type a user id in the memory search first.", "error");
    fn(user);
  };
  $("forget-user-memories").addEventListener("click", needUser((user) => confirmThen(
    `Forget every long-term memory of ${user}? Their sessions stay. This cannot be undone.`,
    () => forgetUser(false))));
  $("forget-user").addEventListener("click", needUser((user) => confirmThen(
    `Forget ${user} entirely: every session and every memory? This cannot be undone.`,
    () => forgetUser(true))));
  $("confirm-no").addEventListener("click", closeConfirm);
  $("confirm-yes").addEventListener("click", () => {
    const action = ui.confirmAction;
    closeConfirm();
    if (action) action().catch(failed);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("confirm").hidden) closeConfirm();
  });
  if (ui.key !== null) {
    $("key").value = ui.key;
    connect(ui.key);
  }
}

wire();
