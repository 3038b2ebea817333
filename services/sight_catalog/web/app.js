// The sight catalog's web UI: pick a city, see its status, and recognise the sights on a photo (a file, a
// dropped file or a webcam frame). It only calls the API (/api/...) of the server it came from.
"use strict";

const BOX_COLOUR = "#ff00ff";
const MAX_WIDTH = 720;
const $ = (id) => document.getElementById(id);

const state = { city: null, stream: null };

function token() {
  return $("token").value.trim();
}

function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

// fetch() the API; the JSON answer, or an Error carrying the problem's detail (RFC 9457).
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    const error = new Error(detail);
    error.status = response.status;
    error.problem = body;
    throw error;
  }
  return body;
}

async function loadCities(selectSlug) {
  const select = $("city");
  const cities = [];
  let next = "/api/cities?limit=200";
  while (next) {
    const page = await api(next);
    cities.push(...page.items);
    next = page.next;
  }
  select.replaceChildren();
  const none = new Option(cities.length ? "Pick a city…" : "No cities yet: request one", "");
  select.add(none);
  for (const city of cities) select.add(new Option(city.name, city.slug));
  const wanted = selectSlug || new URLSearchParams(location.hash.slice(1)).get("city") || "";
  if (wanted && cities.some((c) => c.slug === wanted)) {
    select.value = wanted;
    await pickCity(wanted);
  }
  select.dataset.loaded = String(cities.length);
}

function show(id, value) {
  $(id).textContent = value === null || value === undefined ? "none" : String(value);
}

async function pickCity(slug) {
  state.city = slug || null;
  const section = $("status");
  if (!slug) {
    section.dataset.state = "";
    $("city-name").textContent = "No city picked";
    return;
  }
  history.replaceState(null, "", `#city=${encodeURIComponent(slug)}`);
  const path = `/api/cities/${encodeURIComponent(slug)}`;
  const [city, models] = await Promise.all([api(path), api(`${path}/models?limit=20`)]);
  if (state.city !== slug) return; // another city was picked meanwhile
  const s = city.status;
  $("city-name").textContent = city.name;
  show("status-images", s.images);
  show("status-labelled", s.labelled_images);
  show("status-labels", s.labels);
  show("status-sights", s.sights);
  show("status-model", s.model_version);
  show("status-training", s.training ? `yes (version ${s.training_version})` : "no");
  const rows = $("models").tBodies[0];
  rows.replaceChildren();
  for (const model of models.items) {
    const row = rows.insertRow();
    for (const value of [model.version, model.status, model.images, model.classes.join(", ")]) {
      row.insertCell().textContent = String(value);
    }
  }
  section.dataset.state = s.state;
  section.dataset.city = slug;
}

function loadImage(blob) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot show this file as an image"));
    image.src = URL.createObjectURL(blob);
  });
}

// Draw the photo (shrunk to MAX_WIDTH) and the boxes the API found, in the photo's pixels.
function draw(image, answer) {
  const canvas = $("result");
  const width = answer ? answer.width : image.naturalWidth;
  const height = answer ? answer.height : image.naturalHeight;
  const scale = Math.min(1, MAX_WIDTH / width);
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  canvas.dataset.scale = String(scale);
  canvas.dataset.photo = `${width}x${height}`;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const list = $("sights");
  list.replaceChildren();
  if (!answer) {
    canvas.dataset.boxes = "";
    return;
  }
  ctx.lineWidth = 3;
  ctx.font = "bold 14px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const found of answer.sights) {
    const b = found.box;
    const x = b.x0 * scale;
    const y = b.y0 * scale;
    const w = (b.x1 - b.x0) * scale;
    const h = (b.y1 - b.y0) * scale;
    ctx.strokeStyle = BOX_COLOUR;
    ctx.strokeRect(x, y, w, h);
    const label = `${found.sight} ${(found.score * 100).toFixed(0)}%`;
    const tw = ctx.measureText(label).width + 6;
    const ty = y >= 18 ? y - 18 : y + h;
    ctx.fillStyle = BOX_COLOUR;
    ctx.fillRect(x - 1.5, ty, tw, 18);
    ctx.fillStyle = "#ffffff";
    ctx.fillText(label, x + 1.5, ty + 2);
    const item = document.createElement("li");
    item.textContent = `${found.sight}: ${(found.score * 100).toFixed(1)}%`;
    list.append(item);
  }
  canvas.dataset.boxes = String(answer.sights.length);
}

async function recognise(blob, name) {
  if (!state.city) {
    say("Pick a city first.", true);
    return;
  }
  const city = state.city;
  const canvas = $("result");
  canvas.dataset.boxes = "";
  say("Looking…");
  let image;
  try {
    image = await loadImage(blob);
  } catch (e) {
    say(e.message, true);
    return;
  }
  const form = new FormData();
  form.append("file", blob, name || "photo.jpg");
  const base = `/api/cities/${encodeURIComponent(city)}`;
  let stored = "";
  try {
    if ($("store").checked) {
      const upload = await api(`${base}/images`, { method: "POST", body: form });
      stored = upload.duplicate ? `The city has this photo already (image ${upload.image.id}). `
        : `Stored as image ${upload.image.id}. `;
      say(stored);
    }
    const answer = await api(`${base}/recognitions`, { method: "POST", body: form });
    draw(image, answer);
    const found = answer.sights.length;
    say(`${stored}${found} sight${found === 1 ? "" : "s"} found by model version ${answer.model.version}.`);
  } catch (e) {
    draw(image, null);
    canvas.dataset.boxes = "error";
    say(stored + e.message, true);
  } finally {
    pickCity(city).catch(() => {});
  }
}

function setUpDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) recognise(file, file.name);
  });
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) recognise(file, file.name);
    event.target.value = "";
  });
}

function setUpWebcam() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return; // not offered here
  const start = $("webcam-start");
  const capture = $("webcam-capture");
  const video = $("webcam");
  start.hidden = false;
  start.addEventListener("click", async () => {
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (e) {
      say(`No webcam: ${e.message}`, true);
      return;
    }
    video.srcObject = state.stream;
    video.hidden = false;
    capture.hidden = false;
  });
  capture.addEventListener("click", () => {
    if (!video.videoWidth) {
      say("The webcam has not started yet.", true);
      return;
    }
    const frame = document.createElement("canvas");
    frame.width = video.videoWidth;
    frame.height = video.videoHeight;
    frame.getContext("2d").drawImage(video, 0, 0);
    frame.toBlob((blob) => recognise(blob, "webcam.jpg"), "image/jpeg", 0.92);
  });
}

function setUp() {
  $("token").value = sessionStorage.getItem("tessera-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("tessera-token", token());
    loadCities(state.city).catch((e) => say(e.message, true));
  });
  $("city").addEventListener("change", (event) => {
    pickCity(event.target.value).catch((e) => say(e.message, true));
  });
  $("request-city").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("new-city").value.trim();
    if (!name) return;
    try {
      const city = await api("/api/cities", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name }),
      });
      $("new-city").value = "";
      say(`${city.name} is being collected.`);
      await loadCities(city.slug);
    } catch (e) {
      say(e.message, true);
    }
  });
  setUpDrop();
  setUpWebcam();
  loadCities().catch((e) => say(e.message, true));
}

document.addEventListener("DOMContentLoaded", setUp);
