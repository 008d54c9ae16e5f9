// osdiff comparison page: upload -> /api/compare (streamed progress) -> split view + table.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, file: null, panes: {}, split: 50, busy: false };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}
function showNotes(notes) {
  $("notes").textContent = (notes || []).join("; ");
  $("notes").hidden = !(notes && notes.length);
}
function setProgress(done, total, text) {
  $("progress").hidden = total === 0;
  $("progress-bar").max = total || 1;
  $("progress-bar").value = done;
  $("progress-text").textContent = text || "";
}
function b64ToBlob(b64, mime) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: mime });
}
function fmtBytes(n) { return n < 10240 ? `${n} B` : `${(n / 1024).toFixed(1)} KiB`; }
function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
function fmtSeconds(s) { return s === null || s === undefined ? "–" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`; }
function stem(name) { return name.replace(/\.[^.]*$/, "") || "image"; }

async function errorOf(response) {
  try { return (await response.json()).error || `HTTP ${response.status}`; }
  catch (e) { return `HTTP ${response.status}`; }
}

async function loadInfo() {
  const r = await fetch("/api/info");
  const info = await r.json();
  state.info = info;
  state.settings = {};  // the classical codecs' settings of the last comparison
  $("model-info").textContent = `model ${info.model} (${info.model_hash.slice(0, 8)})`;
  const q = $("quality");
  q.min = 1; q.max = info.quality_levels; q.step = info.quality_step; q.value = info.default_quality;
  showQuality();
  const match = $("match");
  for (const name of info.compare_codecs) {
    const o = document.createElement("option");
    o.value = name; o.textContent = `osdiff to ${name}'s file size`;
    match.appendChild(o);
  }
  $("limits").textContent = `up to ${(info.max_upload_bytes / 2 ** 20).toFixed(0)} MiB, ${(info.max_pixels / 1e6).toFixed(1)} megapixels`;
}

function fmtQuality(q) { return String(Math.round(Number(q) * 1000) / 1000); }

function showQuality() {
  const q = $("quality"), top = state.info ? state.info.quality_levels : 1;
  const v = Number(q.value);
  $("quality-value").textContent = `${fmtQuality(v)}${v === 1 ? " (fewest bits)" : v === top ? " (best)" : ""}`;
}

// "match size": osdiff is coded to the size of the chosen codec's file at its setting (the one the
// last comparison showed, or the codec's default), instead of the other codecs to osdiff's size.
function showMatch() {
  const name = $("match").value;
  $("match-setting-label").hidden = !name;
  $("quality").disabled = state.busy || !!name;
  if (!name) return;
  const range = state.info.compare_settings[name];
  const input = $("match-setting");
  input.min = range.min; input.max = range.max;
  input.value = state.settings[name] !== undefined ? state.settings[name] : range.default;
}

function compareQuery() {
  const name = $("match").value;
  if (!name) return `quality=${$("quality").value}`;
  return `match=${encodeURIComponent(name)}&setting=${encodeURIComponent($("match-setting").value)}`;
}

async function isOsd(file) {
  if (file.name.toLowerCase().endsWith(".osd")) return true;
  const head = new Uint8Array(await file.slice(0, 4).arrayBuffer());
  return head.length === 4 && head[0] === 0x89 && head[1] === 0x4f && head[2] === 0x53 && head[3] === 0x44;
}

async function handleFile(file) {
  if (!file || state.busy) return;
  showError(""); showNotes([]);
  if (file.size > state.info.max_upload_bytes) {
    showError(`${file.name}: ${file.size} bytes is over the limit of ${state.info.max_upload_bytes} bytes`);
    return;
  }
  state.file = file;
  state.isOsd = await isOsd(file);
  if (state.isOsd) await decompress(file); else await compare(file);
}

async function withBusy(fn) {
  state.busy = true;
  for (const id of ["file", "quality", "match", "match-setting"]) $(id).disabled = true;
  try { await fn(); }
  catch (e) { showError(`request failed: ${e.message || e}`); }
  finally {
    state.busy = false;
    for (const id of ["file", "match", "match-setting"]) $(id).disabled = false;
    showMatch();
    setProgress(0, 0, "");
  }
}

function compare(file) {
  return withBusy(async () => {
    setProgress(0, 1, "uploading…");
    const r = await fetch(`/api/compare?progress=1&${compareQuery()}`, { method: "POST", body: file });
    if (!r.ok) { showError(await errorOf(r)); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (event.error) { showError(event.error); return; }
        if (event.result) { showComparison(file, event.result); return; }
        setProgress(event.progress, event.total, `${event.stage}…`);
      }
      if (done) { showError("the server closed the connection"); return; }
    }
  });
}

function decompress(file) {
  return withBusy(async () => {
    setProgress(0, 1, "decoding…");
    const r = await fetch("/api/decompress", { method: "POST", body: file });
    if (!r.ok) { showError(await errorOf(r)); return; }
    const result = await r.json();
    const png = b64ToBlob(result.png, "image/png");
    setPanes({ decoded: { url: URL.createObjectURL(png) } }, "decoded", "decoded");
    fillTable([{ codec: `${result.model} (decoded)`, setting: result.quality, bytes: result.bytes, bpp: result.bpp,
      lpips: null, dists: null, psnr: null, encode_s: null, decode_s: result.decode_s,
      downloads: [["decoded PNG", png, `${stem(file.name)}.png`, "download-png"]] }]);
  });
}

function showComparison(file, result) {
  showNotes(result.warnings);
  for (const r of result.results.slice(1)) state.settings[r.codec] = r.setting;
  $("quality").value = result.quality; showQuality();  // with a match: the quality osdiff reached
  const panes = { original: { url: URL.createObjectURL(b64ToBlob(result.original_png, "image/png")) } };
  const rows = [];
  for (const r of result.results) {
    const blob = b64ToBlob(r.file, r.mime);
    const downloads = [[r.suffix.slice(1) + " file", blob, stem(file.name) + r.suffix, `download-${r.codec === result.results[0].codec ? "osd" : r.codec}`]];
    let url = URL.createObjectURL(blob);
    if (r.png) {  // osdiff: the browser cannot decode .osd; show the server's decoded PNG
      const png = b64ToBlob(r.png, "image/png");
      url = URL.createObjectURL(png);
      downloads.push(["decoded PNG", png, `${stem(file.name)}.osdiff.png`, "download-png"]);
    }
    panes[r.codec] = { url };
    if (r.png && result.match) r.setting = `${fmtQuality(r.setting)} (${r.encodes} encode${r.encodes === 1 ? "" : "s"}${r.fits ? "" : ", too large"})`;
    else if (r.png) r.setting = fmtQuality(r.setting);
    rows.push({ ...r, downloads });
  }
  const learned = result.results[0].codec;
  setPanes(panes, "original", learned);
  fillTable(rows);
}

function setPanes(panes, left, right) {
  for (const old of Object.values(state.panes)) URL.revokeObjectURL(old.url);
  state.panes = panes;
  for (const id of ["left", "right"]) {
    const select = $(id);
    select.innerHTML = "";
    for (const name of Object.keys(panes)) {
      const o = document.createElement("option");
      o.value = name; o.textContent = name;
      select.appendChild(o);
    }
  }
  $("left").value = left; $("right").value = right;
  $("viewer").hidden = false;
  updatePanes();
}

function updatePanes() {
  for (const side of ["left", "right"]) {
    const name = $(side).value;
    $(`img-${side}`).src = state.panes[name].url;
    $(`label-${side}`).textContent = name;
  }
}

function fillTable(rows) {
  const body = $("results").querySelector("tbody");
  body.innerHTML = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.codec = r.codec;
    const cells = [r.codec, r.setting, fmtBytes(r.bytes), fmt(r.bpp, 3), fmt(r.lpips, 3), fmt(r.dists, 3),
      r.psnr === null ? "–" : `${fmt(r.psnr, 2)} dB`, fmtSeconds(r.encode_s), fmtSeconds(r.decode_s)];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    const td = document.createElement("td");
    for (const [label, blob, name, id] of r.downloads) {
      const a = document.createElement("a");
      a.textContent = label; a.download = name; a.href = URL.createObjectURL(blob); a.id = id;
      td.appendChild(a);
    }
    tr.appendChild(td);
    body.appendChild(tr);
  }
  $("results").hidden = false;
}

function setSplit(percent) {
  state.split = Math.min(100, Math.max(0, percent));
  $("img-right").style.clipPath = `inset(0 0 0 ${state.split}%)`;
  $("divider").style.left = `${state.split}%`;
  $("slider").value = state.split;
}

function setZoom() {
  const zoom = Number($("zoom").value);
  const img = $("img-left");
  $("canvas").style.width = zoom === 0 || !img.naturalWidth ? "100%" : `${img.naturalWidth * zoom}px`;
  $("canvas").classList.toggle("pixelated", zoom > 1);
}

function dragSplit(event) {
  const box = $("canvas").getBoundingClientRect();
  setSplit(((event.clientX - box.left) / box.width) * 100);
}

function init() {
  $("file").addEventListener("change", () => handleFile($("file").files[0]));
  $("quality").addEventListener("input", showQuality);
  $("quality").addEventListener("change", () => { if (state.file && !state.isOsd) handleFile(state.file); });
  $("match").addEventListener("change", () => { showMatch(); if (state.file && !state.isOsd) handleFile(state.file); });
  $("match-setting").addEventListener("change", () => { if (state.file && !state.isOsd && $("match").value) handleFile(state.file); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFile(e.dataTransfer.files[0]); });
  $("left").addEventListener("change", updatePanes);
  $("right").addEventListener("change", updatePanes);
  $("slider").addEventListener("input", () => setSplit(Number($("slider").value)));
  $("zoom").addEventListener("change", setZoom);
  $("img-left").addEventListener("load", setZoom);
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); dragSplit(e); });
  canvas.addEventListener("pointermove", (e) => { if (canvas.hasPointerCapture(e.pointerId)) dragSplit(e); });
  setSplit(50);
  loadInfo().catch((e) => showError(`cannot reach the osdiff server (${e.message || e})`));
}
init();
