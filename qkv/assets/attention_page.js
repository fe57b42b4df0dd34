// qkv attention page (qkv/attention_page.py inlines this file): the data is in #qkv-data.
"use strict";
const D = JSON.parse(document.getElementById("qkv-data").textContent);
const $ = (id) => document.getElementById(id);
const st = {g: 0, layer: 0, head: 0, q: -1, key: -1, pinned: false, cell: 1, norm: "matrix", from: ""};
const cache = new Map();
const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],
                 [53,183,121],[109,205,89],[180,222,44],[253,231,37]];

function u16(b64) {
  const bin = atob(b64), out = new Uint16Array(bin.length >> 1);
  for (let i = 0; i < out.length; i++) out[i] = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
  return out;
}
function group() { return D.groups[st.g]; }
function headMatrix(g, layer, head) {
  const grp = D.groups[g], T = grp.queries.length, S = grp.keys.length, m = grp.maps[layer][head];
  const out = new Float32Array(T * S), val = u16(m.val);
  if (m.idx === null) { for (let i = 0; i < val.length; i++) out[i] = val[i] / 65535; return out; }
  const idx = u16(m.idx), k = m.k;
  for (let r = 0; r < T; r++) for (let j = 0; j < k; j++) out[r * S + idx[r * k + j]] = val[r * k + j] / 65535;
  return out;
}
function matrix() {
  const key = st.g + "/" + st.layer + "/" + st.head;
  if (cache.has(key)) return cache.get(key);
  const grp = group();
  let m;
  if (st.head === "mean") {
    m = new Float32Array(grp.queries.length * grp.keys.length);
    for (let h = 0; h < grp.heads; h++) { const x = headMatrix(st.g, st.layer, h); for (let i = 0; i < m.length; i++) m[i] += x[i] / grp.heads; }
  } else m = headMatrix(st.g, st.layer, st.head);
  let max = 0; for (let i = 0; i < m.length; i++) if (m[i] > max) max = m[i];
  m.max = max || 1;
  cache.set(key, m);
  return m;
}
function colour(v) {
  const x = Math.max(0, Math.min(1, v)) * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  return VIRIDIS[i].map((c, n) => Math.round(c + f * (VIRIDIS[i + 1][n] - c)));
}
function option(sel, value, text) { const o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o); }
function tokens(box, labels, side) {
  box.textContent = "";
  labels.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok"; s.textContent = t; s.dataset.i = i; s.dataset.side = side; s.title = side + " #" + i;
    box.appendChild(s);
  });
}
function setup() {
  $("title").textContent = D.title;
  $("notes").textContent = D.notes.join(" \u00b7 ");
  D.groups.forEach((g, i) => option($("group"), i, g.name));
  st.norm = D.groups.some((g) => g.queries.length > 100) ? "row" : "matrix"; $("norm").value = st.norm;
  const cross = D.groups.findIndex((g) => g.kind === "cross");
  selectGroup(cross >= 0 ? cross : 0);
}
function selectGroup(g) {
  st.g = g; st.q = -1; st.key = -1; st.pinned = false;
  const grp = group();
  $("group").value = String(g);
  $("layer").textContent = "";
  grp.layers.forEach((l) => option($("layer"), l, String(l)));
  st.layer = grp.layers[grp.layers.length - 1];
  $("layer").value = String(st.layer);
  $("head").textContent = "";
  for (let h = 0; h < grp.heads; h++) option($("head"), h, String(h));
  if (grp.heads > 1) option($("head"), "mean", "mean of heads");
  st.head = 0; $("head").value = "0";
  tokens($("queries"), grp.queries, "query");
  tokens($("keys"), grp.keys, "key");
  if (grp.grid && D.image) { st.q = 0; }
  $("imagebox").hidden = !(grp.grid && D.image);
  render();
}
function drawHeatmap(m) {
  const grp = group(), T = grp.queries.length, S = grp.keys.length;
  const cell = Math.max(1, Math.min(28, Math.floor(640 / Math.max(T, S))));
  st.cell = cell;
  const c = $("heatmap"); c.width = S * cell; c.height = T * cell;
  const ctx = c.getContext("2d"), img = ctx.createImageData(S * cell, T * cell), px = img.data;
  for (let r = 0; r < T; r++) { let top = m.max;
    if (st.norm === "row") { top = 0; for (let j = 0; j < S; j++) top = Math.max(top, m[r * S + j]); top = top || 1; }
    for (let j = 0; j < S; j++) {
    const [R, G, B] = colour(m[r * S + j] / top);
    for (let y = 0; y < cell; y++) { let o = ((r * cell + y) * S * cell + j * cell) * 4;
      for (let x = 0; x < cell; x++, o += 4) { px[o] = R; px[o + 1] = G; px[o + 2] = B; px[o + 3] = 255; } }
  } }
  ctx.putImageData(img, 0, 0);
  $("scale").textContent = st.norm === "row" ? "(colour: weight from 0 to the largest of its row)"
    : "(colour: weight from 0 to the largest, " + m.max.toFixed(3) + ")";
  c.dataset.row = ""; c.dataset.col = "";
  if (st.q >= 0) {
    const row = m.subarray(st.q * S, (st.q + 1) * S), best = argmax(row);
    ctx.lineWidth = Math.max(1, Math.min(2, cell / 4));
    ctx.strokeStyle = "#ffffff"; ctx.strokeRect(0.5, st.q * cell + 0.5, S * cell - 1, cell - 1);
    ctx.strokeStyle = "#ff1744"; ctx.lineWidth = Math.max(2, cell / 4);
    ctx.strokeRect(best * cell, st.q * cell, cell, cell);
    c.dataset.row = String(st.q); c.dataset.col = String(best);
  }
}
function reveal(box, span) {  // scroll a token panel (not the page) to show span
  if (box.scrollHeight <= box.clientHeight) return;
  const top = span.offsetTop - box.offsetTop;
  if (top < box.scrollTop || top > box.scrollTop + box.clientHeight - span.offsetHeight) box.scrollTop = top - box.clientHeight / 2;
}
function argmax(row) { let b = 0; for (let j = 1; j < row.length; j++) if (row[j] > row[b]) b = j; return b; }
function paint(spans, weights, max, selected) {
  const best = weights ? argmax(weights) : -1;
  spans.forEach((s, i) => {
    const w = weights ? weights[i] : 0;
    s.style.background = weights ? "rgba(255,111,0," + (w / max).toFixed(3) + ")" : "";
    s.dataset.w = weights ? w.toFixed(4) : "";
    s.classList.toggle("top", i === best && weights !== null);
    s.classList.toggle("sel", i === selected);
  });
}
function render() {
  const grp = group(), S = grp.keys.length, T = grp.queries.length, m = matrix();
  document.body.dataset.group = grp.kind; document.body.dataset.layer = st.layer;
  document.body.dataset.head = st.head; document.body.dataset.query = st.q; document.body.dataset.key = st.key;
  drawHeatmap(m);
  const qs = Array.from($("queries").children), ks = Array.from($("keys").children);
  if (st.q >= 0) {
    const row = m.slice(st.q * S, (st.q + 1) * S);
    let rmax = 0; row.forEach((v) => { if (v > rmax) rmax = v; });
    paint(ks, row, rmax || 1, -1); paint(qs, null, 1, st.q);
    reveal($("keys"), ks[argmax(row)]); if (st.from === "heatmap") reveal($("queries"), qs[st.q]);
    const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, 5);
    $("readout").textContent = "query #" + st.q + " " + JSON.stringify(grp.queries[st.q]) + " -> " +
      order.map((j) => JSON.stringify(grp.keys[j]) + " " + row[j].toFixed(3)).join(", ") +
      (st.key >= 0 ? "   | weight on key #" + st.key + ": " + row[st.key].toFixed(4) : "");
  } else if (st.key >= 0) {
    const col = new Float32Array(T); let cmax = 0;
    for (let r = 0; r < T; r++) { col[r] = m[r * S + st.key]; if (col[r] > cmax) cmax = col[r]; }
    paint(qs, col, cmax || 1, -1); paint(ks, null, 1, st.key);
    $("readout").textContent = "key #" + st.key + " " + JSON.stringify(grp.keys[st.key]) + ": the queries are coloured by the weight they give it";
  } else { paint(qs, null, 1, -1); paint(ks, null, 1, -1); $("readout").textContent = "hover a query token to see its weights"; }
  drawImage(m);
}
function drawImage(m) {
  const grp = group();
  if (!(grp.grid && D.image) || st.q < 0) return;
  const img = drawImage.img || (drawImage.img = new Image());
  if (!img.src) { img.onload = () => drawImage(matrix()); img.src = D.image; }
  if (!img.complete || !img.naturalWidth) return;
  const [gh, gw] = grp.grid, S = grp.keys.length, k = grp.n_special, scale = Math.max(1, Math.floor(288 / img.naturalWidth));
  const c = $("image"); c.width = img.naturalWidth * scale; c.height = img.naturalHeight * scale;
  const ctx = c.getContext("2d"); ctx.imageSmoothingEnabled = false; ctx.drawImage(img, 0, 0, c.width, c.height);
  const row = m.subarray(st.q * S + k, (st.q + 1) * S); let max = 0; row.forEach((v) => { if (v > max) max = v; });
  const pw = c.width / gw, ph = c.height / gh;
  for (let p = 0; p < gh * gw; p++) {
    ctx.fillStyle = "rgba(255,23,68," + (0.75 * row[p] / (max || 1)).toFixed(3) + ")";
    ctx.fillRect((p % gw) * pw, Math.floor(p / gw) * ph, pw, ph);
  }
  if (st.q >= k) { ctx.strokeStyle = "#2979ff"; ctx.lineWidth = 2; const p = st.q - k; ctx.strokeRect((p % gw) * pw, Math.floor(p / gw) * ph, pw, ph); }
}
function hoverToken(e) {
  const s = e.target.closest(".tok"); if (!s || st.pinned) return;
  const i = Number(s.dataset.i); st.from = "tokens";
  if (s.dataset.side === "query") { st.q = i; st.key = -1; } else { st.key = i; st.q = group().grid && D.image ? st.q : -1; }
  render();
}
function clickToken(e) {
  const s = e.target.closest(".tok"); if (!s) return;
  st.pinned = false; hoverToken(e); st.pinned = true;
}
function cellAt(e) {
  const c = $("heatmap"), r = c.getBoundingClientRect(), grp = group();
  const j = Math.floor((e.clientX - r.left) / st.cell), i = Math.floor((e.clientY - r.top) / st.cell);
  return (i >= 0 && j >= 0 && i < grp.queries.length && j < grp.keys.length) ? [i, j] : null;
}
$("heatmap").addEventListener("mousemove", (e) => { const ij = cellAt(e); if (!ij || st.pinned) return; [st.q, st.key] = ij; st.from = "heatmap"; render(); });
$("heatmap").addEventListener("click", (e) => { const ij = cellAt(e); if (!ij) return; st.pinned = !st.pinned; [st.q, st.key] = ij; render(); });
for (const id of ["queries", "keys"]) { $(id).addEventListener("mouseover", hoverToken); $(id).addEventListener("click", clickToken); }
document.addEventListener("keydown", (e) => { if (e.key === "Escape") { st.pinned = false; render(); } });
$("group").addEventListener("change", (e) => selectGroup(Number(e.target.value)));
$("layer").addEventListener("change", (e) => { st.layer = Number(e.target.value); render(); });
$("norm").addEventListener("change", (e) => { st.norm = e.target.value; render(); });
$("head").addEventListener("change", (e) => { st.head = e.target.value === "mean" ? "mean" : Number(e.target.value); render(); });
setup();
