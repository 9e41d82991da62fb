// The search page: GET /api/search for the ranking, then GET /api/explain per result for the MaxSim alignment.
"use strict";

const $ = (id) => document.getElementById(id);
// Query tokens that are not words of the query: markers and the [MASK] padding ColBERT scores too.
const SPECIAL = new Set(["[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]", "[UNK]", "[PAD]"]);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.setAttribute("style", value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function pollHealth() {
  try {
    const health = await getJSON("/health");
    $("status").textContent = health.status === "ok"
      ? `ready · ${health.passages.toLocaleString()} passages`
      : "warming up (searches wait)";
    $("status").className = `status ${health.status}`;
    if (health.status !== "ok") setTimeout(pollHealth, 1000);
  } catch (e) {
    $("status").textContent = "unreachable";
    setTimeout(pollHealth, 3000);
  }
}

// The passage text with each matched token wrapped in <mark>, its strength as the highlight's opacity.
function highlighted(text, matches) {
  const byPosition = new Map();
  for (const m of matches) {
    if (m.start === null) continue;
    const entry = byPosition.get(m.doc_position) || { start: m.start, end: m.end, by: [] };
    entry.by.push(m);
    byPosition.set(m.doc_position, entry);
  }
  const spans = [...byPosition.values()].sort((a, b) => a.start - b.start);
  const top = Math.max(...matches.map((m) => m.score), 1e-6);
  const out = el("p", { class: "text" });
  let at = 0;
  for (const span of spans) {
    if (span.start < at) continue;
    out.append(text.slice(at, span.start));
    const words = span.by.filter((m) => !SPECIAL.has(m.query_token));
    const best = Math.max(...span.by.map((m) => m.score));
    const mark = el("mark", {
      class: words.length ? "match" : "match special",
      title: span.by.map((m) => `${shown(m.query_token)} → ${shown(m.doc_token)}: ${m.score.toFixed(3)}`).join("\n"),
      style: `--alpha: ${(0.15 + 0.65 * Math.max(best, 0) / top).toFixed(2)}`,
    }, text.slice(span.start, span.end));
    mark.dataset.queryTokens = span.by.map((m) => m.query_token).join(" ");
    out.append(mark);
    at = span.end;
  }
  out.append(text.slice(at));
  return out;
}

// The checkpoint's marker tokens, under the names the ColBERT paper gives them.
const shown = (token) => ({ "[unused0]": "[Q]", "[unused1]": "[D]" })[token] || token;

function alignmentRow(queryToken, docToken, score, top, cls) {
  return el("tr", { class: cls },
    el("td", {}, queryToken),
    el("td", {}, docToken),
    el("td", { class: "score" }, score.toFixed(3)),
    el("td", {}, el("span", { class: "bar", style: `width: ${Math.max(0, 80 * score / top).toFixed(0)}px` })));
}

// One row per query token; the [MASK] padding (query augmentation) in one row, its scores summed.
function alignmentTable(explanation) {
  const matches = explanation.matches;
  const top = Math.max(...matches.map((m) => m.score), 1e-6);
  const masks = matches.filter((m) => m.query_token === "[MASK]");
  const rows = matches.filter((m) => m.query_token !== "[MASK]").map((m) => alignmentRow(
    shown(m.query_token), `${shown(m.doc_token)} (#${m.doc_position})`, m.score, top,
    SPECIAL.has(m.query_token) ? "special" : "word"));
  if (masks.length) {
    const counts = new Map();
    for (const m of masks) counts.set(shown(m.doc_token), (counts.get(shown(m.doc_token)) || 0) + 1);
    const matched = [...counts].sort((a, b) => b[1] - a[1]).map(([token, n]) => `${token} ×${n}`).join(", ");
    const sum = masks.reduce((total, m) => total + m.score, 0);
    rows.push(alignmentRow(`[MASK] ×${masks.length}`, matched, sum, top * masks.length, "special masks"));
  }
  const words = matches.filter((m) => !SPECIAL.has(m.query_token)).length;
  return el("details", {},
    el("summary", {}, `why: ${words} query words, ${matches.length - words} markers and [MASK] padding, ` +
      `summing to ${explanation.score.toFixed(3)}`),
    el("table", { class: "alignment" },
      el("tr", {}, el("th", {}, "query token"), el("th", {}, "best passage token"), el("th", {}, "score"), el("th")),
      ...rows));
}

async function explain(query, hit, item) {
  try {
    const params = new URLSearchParams({ query, pid: hit.pid });
    const explanation = await getJSON(`/api/explain?${params}`);
    item.querySelector(".text").replaceWith(highlighted(explanation.text, explanation.matches));
    item.append(alignmentTable(explanation));
    item.classList.add("explained");
  } catch (e) {
    item.append(el("p", { class: "error" }, `could not explain this result: ${e.message}`));
  }
}

async function search(event) {
  if (event) event.preventDefault();
  const query = $("query").value;
  if (!query.trim()) return;
  const k = $("k").value;
  history.replaceState(null, "", `?${new URLSearchParams({ q: query, k })}`);
  showError("");
  $("go").disabled = true;
  $("summary").textContent = "searching…";
  $("results").replaceChildren();
  const t0 = performance.now();
  try {
    const body = await getJSON(`/api/search?${new URLSearchParams({ query, k })}`);
    $("summary").textContent = `${body.topk.length} results in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
    const items = body.topk.map((hit) => el("li", { class: "result" },
      el("div", { class: "meta" },
        el("span", { class: "rank" }, `#${hit.rank}`),
        el("span", {}, `pid ${hit.pid}`),
        el("span", { class: "score" }, `score ${hit.score.toFixed(3)}`),
        el("span", {}, `p ${hit.prob.toFixed(3)}`)),
      el("p", { class: "text" }, hit.text)));
    items.forEach((item, i) => { item.dataset.pid = body.topk[i].pid; });
    $("results").replaceChildren(...items);
    await Promise.all(body.topk.map((hit, i) => explain(query, hit, items[i])));
    if (items.length) items[0].querySelector("details")?.setAttribute("open", "");
  } catch (e) {
    $("summary").textContent = "";
    showError(e.message);
  } finally {
    $("go").disabled = false;
  }
}

$("search").addEventListener("submit", search);
pollHealth();
const initial = new URLSearchParams(location.search);
if (initial.get("k")) $("k").value = initial.get("k");
if (initial.get("q")) { $("query").value = initial.get("q"); search(); }
