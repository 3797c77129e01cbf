// EditForge review page: one pair at a time, labelled with the keyboard; labels POSTed to /api/labels.
"use strict";

const KEYS = { "1": "good", "g": "good", "2": "wrong", "w": "wrong", "3": "broken", "b": "broken",
               "4": "unsure", "u": "unsure" };
const NAMES = { good: "good edit", wrong: "wrong edit", broken: "broken image", unsure: "unsure" };
const REVIEWER_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$/;
const PRELOAD = 3;
const state = { items: [], thresholds: {}, i: 0, mine: {}, byReviewer: {}, reviewer: "", session: "",
                pending: 0, failed: 0, preloaded: [] };
const $ = (id) => document.getElementById(id);

function randomId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function keyOf(item) { return item.partition + "/" + item.sample_key; }

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(url + ": " + response.status + " " + (await response.text()));
  return response.json();
}

async function loadLabels() {
  if (!state.reviewer) { state.mine = {}; return; }
  const got = await getJSON("/api/labels?reviewer=" + encodeURIComponent(state.reviewer));
  state.mine = got.labels;
  state.byReviewer = got.by_reviewer;
}

function firstUnlabelled(from) {
  for (let k = 0; k < state.items.length; k++) {
    const j = (from + k) % state.items.length;
    if (!(keyOf(state.items[j]) in state.mine)) return j;
  }
  return from;
}

function fmt(x) { return x === null || x === undefined ? "–" : Number(x).toFixed(3); }

function showProgress() {
  const mine = Object.keys(state.mine).length;
  const others = Object.entries(state.byReviewer).filter(([r]) => r !== state.reviewer);
  const p = $("progress");
  p.dataset.mine = String(mine);
  p.textContent = `pair ${state.i + 1} of ${state.items.length} · ${mine} labelled by you` +
    (others.length ? " · others: " + others.map(([r, n]) => `${r} ${n}`).join(", ") : "");
  const s = $("saving");
  s.dataset.pending = String(state.pending);
  s.textContent = state.pending ? `saving ${state.pending}…` : (state.failed ? `${state.failed} not saved` : "all saved");
}

function scoreRows(item) {
  const body = $("scores").querySelector("tbody");
  body.replaceChildren();
  for (const [name, value] of Object.entries(item.scores)) {
    const row = document.createElement("tr");
    const limit = state.thresholds[name];
    const cells = [name, fmt(value), limit === undefined ? "" : "≥ " + fmt(limit),
                   limit === undefined ? "" : (value >= limit ? "pass" : "fail")];
    cells.forEach((text, k) => {
      const cell = document.createElement(k === 0 ? "th" : "td");
      cell.textContent = text;
      if (k === 3 && text) cell.className = text;
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
}

function show() {
  const item = state.items[state.i];
  if (!item) return;
  $("pair").hidden = false;
  $("pair").dataset.key = keyOf(item);
  $("instruction").textContent = item.edit;
  $("input").textContent = item.input;
  $("output").textContent = item.output;
  $("before").src = item.before;
  $("after").src = item.after;
  const status = $("status");
  status.textContent = `${item.status} · sample ${item.stratum} (weight ${Number(item.weight).toFixed(2)})`;
  status.className = item.status.split(/[ :,]/)[0];
  const mine = state.mine[keyOf(item)];
  $("current").textContent = mine ? "your label: " + NAMES[mine] : "";
  document.querySelectorAll("#choices button").forEach((b) => b.classList.toggle("chosen", b.dataset.label === mine));
  scoreRows(item);
  const p = item.params;
  $("params").textContent = `seed ${p.seed} · p ${fmt(p.p2p_p)} · cfg ${fmt(p.cfg_scale)} · ${item.sample_key} (partition ${item.partition})`;
  showProgress();
  preload();
}

function preload() {
  // the next pairs' images, fetched while this one is shown; #pair[data-preloaded] counts those loaded
  const images = [];
  state.preloaded = images;
  $("pair").dataset.preloaded = "0";
  const loaded = () => {
    if (state.preloaded === images) $("pair").dataset.preloaded = String(images.filter((i) => i.complete).length);
  };
  for (let k = 1; k <= PRELOAD; k++) {
    const next = state.items[state.i + k];
    if (!next) break;
    for (const src of [next.before, next.after]) {
      const image = new Image();
      image.onload = loaded;
      image.onerror = loaded;
      image.src = src;
      images.push(image);
    }
  }
}

function go(i) {
  if (i < 0 || i >= state.items.length) return;
  state.i = i;
  show();
}

async function label(value) {
  const item = state.items[state.i];
  if (!item) return;
  if (!REVIEWER_RE.test(state.reviewer)) {
    $("message").textContent = "type your reviewer name first (letters, digits, . _ -)";
    $("reviewer").focus();
    return;
  }
  const key = keyOf(item);
  const before = state.mine[key];
  state.mine[key] = value;
  state.pending += 1;
  $("message").textContent = "";
  if (state.i < state.items.length - 1) go(state.i + 1); else show();
  try {
    const response = await fetch("/api/labels", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ partition: item.partition, sample_key: item.sample_key, label: value,
                             reviewer: state.reviewer, session: state.session, pair_sha256: item.pair_sha256 }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.statusText }));
      throw new Error(body.error || response.statusText);
    }
    state.byReviewer[state.reviewer] = Object.keys(state.mine).length;
  } catch (err) {
    if (before === undefined) delete state.mine[key]; else state.mine[key] = before;
    state.failed += 1;
    $("message").textContent = `not saved (${item.sample_key}): ${err.message}`;
  } finally {
    state.pending -= 1;
    showProgress();
  }
}

async function setReviewer(name) {
  if (!REVIEWER_RE.test(name)) {
    $("message").textContent = "reviewer: 1-40 letters, digits, '.', '_' or '-'";
    return;
  }
  state.reviewer = name;
  localStorage.setItem("editforge-review-reviewer", name);
  $("message").textContent = "";
  await loadLabels();
  go(firstUnlabelled(0));
}

document.addEventListener("keydown", (event) => {
  if (event.target === $("reviewer")) {
    if (event.key === "Enter") $("reviewer").blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key in KEYS) { event.preventDefault(); label(KEYS[key]); }
  else if (key === "arrowright" || key === "j") { event.preventDefault(); go(state.i + 1); }
  else if (key === "arrowleft" || key === "k") { event.preventDefault(); go(state.i - 1); }
  else if (key === "n") { event.preventDefault(); go(firstUnlabelled(state.i)); }
});

async function init() {
  const queue = await getJSON("/api/queue");
  state.items = queue.items;
  state.thresholds = queue.thresholds;
  $("run").textContent = `${queue.run} · render ${queue.render_hash}`;
  $("notes").textContent = queue.notes.join(" ");
  state.session = sessionStorage.getItem("editforge-review-session") || randomId();
  sessionStorage.setItem("editforge-review-session", state.session);
  const name = localStorage.getItem("editforge-review-reviewer") || queue.reviewer_hint || "";
  $("reviewer").value = name;
  $("reviewer").addEventListener("change", () => setReviewer($("reviewer").value.trim()));
  document.querySelectorAll("#choices button").forEach((b) => b.addEventListener("click", () => label(b.dataset.label)));
  for (const id of ["before", "after"]) {
    $(id).addEventListener("load", () => $(id).classList.toggle("small", $(id).naturalWidth < 256));
  }
  if (!state.items.length) {
    $("message").textContent = "no pair to review: no rendered pair of this run has its images stored";
  } else if (REVIEWER_RE.test(name)) {
    await setReviewer(name);
  } else {
    go(0);
  }
  document.body.dataset.ready = "1";
}

init().catch((err) => { $("message").textContent = "could not load the review: " + err.message; });
