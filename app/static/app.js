// The search page: plain JavaScript over the REST API, no build step, no inline code (CSP-ready).
// Anything that comes from data (file names, labels, metadata) reaches the DOM only through
// textContent or attributes; this file never parses HTML strings.
(function () {
  "use strict";

  const root = document.getElementById("app");
  const picker = document.getElementById("collection");
  if (!root || !picker) return; // the "no collections yet" page has nothing to drive

  const API = root.dataset.api || "/api/v1";
  const MAX_K = Number(root.dataset.maxK) || 100;
  const DEFAULT_K = 10;
  const STAGES = ["decode", "embed", "search", "fetch", "total"];
  const ACCEPTED = ["image/png", "image/jpeg", "image/gif", "image/webp"];
  const STORED_IMAGE_URL = /\/api\/v1\/images\/(\d+)\/(?:file|thumbnail)\b/;

  const ui = {
    alert: byId("alert"),
    k: byId("k"),
    meta: byId("collection-meta"),
    notReady: byId("not-ready"),
    file: byId("file"),
    dropzone: byId("dropzone"),
    figure: byId("query-figure"),
    queryImage: byId("query-image"),
    caption: byId("query-caption"),
    timings: byId("timings"),
    status: byId("status"),
    results: byId("results"),
  };

  // The current query: {kind: "file", file} or {kind: "image", id, imageUrl, lines}.
  let query = null;
  let objectUrl = null;
  let inFlight = null; // AbortController of the running request: a newer query cancels it
  let dragDepth = 0;
  const hitsById = new Map();

  function byId(id) {
    return document.getElementById(id);
  }

  /** A new element; `text` goes in as textContent, `attrs` as attributes. */
  function el(tag, { className, text, attrs } = {}, children = []) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(name, String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  /** Only same-origin URLs from the API become image sources. */
  function sameOrigin(url) {
    try {
      const parsed = new URL(url, window.location.href);
      return parsed.origin === window.location.origin ? parsed.href : null;
    } catch {
      return null;
    }
  }

  function thumbnailSrc(url) {
    const src = sameOrigin(url);
    if (!src) return null;
    const size = window.devicePixelRatio > 1.5 ? 256 : 128;
    const parsed = new URL(src);
    parsed.searchParams.set("size", String(size));
    return parsed.href;
  }

  // Small images (MNIST is 28x28) are scaled up with crisp pixels; large ones are smoothed.
  function pixelateWhenUpscaled(img) {
    const check = () => {
      if (!img.naturalWidth || !img.naturalHeight) return;
      // object-fit: contain draws the image at this scale inside its box.
      const scale = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
      img.classList.toggle("pixelated", scale > 1);
    };
    img.addEventListener("load", check);
    if (img.complete) check();
  }

  // ---- collection and k ----------------------------------------------------------------------

  function selectedOption() {
    return picker.selectedOptions[0] || null;
  }

  function collectionName() {
    return picker.value;
  }

  function isReady() {
    const option = selectedOption();
    return Boolean(option && option.dataset.ready === "true");
  }

  function currentK() {
    const k = Number(ui.k.value);
    return Number.isInteger(k) && k >= 1 ? Math.min(k, MAX_K) : DEFAULT_K;
  }

  function count(n) {
    return Number(n || 0).toLocaleString("en");
  }

  function describeCollection() {
    const option = selectedOption();
    if (!option) return;
    const d = option.dataset;
    // Versions usually repeat the embedder's name ("tiny-v1"): say it once.
    const version = d.version && !d.version.startsWith(d.embedder) ? `${d.embedder} ${d.version}` : d.version;
    const parts = [version || d.embedder];
    if (d.dim) parts.push(`${d.dim}-d`);
    parts.push(`${count(d.indexed)} of ${count(d.images)} images indexed`);
    ui.meta.textContent = parts.join(" · ");

    const ready = isReady();
    ui.notReady.hidden = ready;
    if (!ready) {
      const code = ui.notReady.querySelector("code");
      if (code) code.textContent = `cbir train ${d.embedder} --collection ${option.value}`;
    }
    ui.file.disabled = !ready;
    ui.dropzone.classList.toggle("disabled", !ready);
    ui.dropzone.setAttribute("aria-disabled", String(!ready));
  }

  // ---- messages ------------------------------------------------------------------------------

  function showError(error) {
    ui.alert.replaceChildren();
    if (error.title) ui.alert.append(el("strong", { text: `${error.title}:` }), " ");
    ui.alert.append(error.detail || String(error));
    ui.alert.hidden = false;
  }

  function clearError() {
    ui.alert.hidden = true;
    ui.alert.replaceChildren();
  }

  function setStatus(text) {
    ui.status.textContent = text;
  }

  class ApiError extends Error {
    constructor(title, detail, status) {
      super(detail);
      this.title = title;
      this.detail = detail;
      this.status = status;
    }
  }

  /** JSON from the API; failures become an ApiError carrying the problem's title and detail. */
  async function api(path, init = {}) {
    let response;
    try {
      response = await fetch(API + path, { ...init, headers: { accept: "application/json" } });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("Network error", "The server could not be reached; is it running?", 0);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const title = (body && body.title) || `HTTP ${response.status}`;
      const detail = (body && body.detail) || response.statusText || "the request failed";
      throw new ApiError(title, String(detail), response.status);
    }
    return body;
  }

  // ---- the query panel -----------------------------------------------------------------------

  function showQuery(src, lines) {
    ui.queryImage.src = src;
    ui.queryImage.alt = lines[0] ? `Query: ${lines[0]}` : "Query image";
    ui.caption.replaceChildren(
      ...lines.map((line, i) => el("span", { className: i === 0 ? "caption-main" : "caption-sub", text: line })),
    );
    ui.figure.hidden = false;
    setDropTitle("Drop another image here");
  }

  function setDropTitle(text) {
    const title = ui.dropzone.querySelector(".dropzone-title");
    if (title) title.textContent = text;
  }

  function clearQuery() {
    query = null;
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = null;
    ui.figure.hidden = true;
    ui.queryImage.removeAttribute("src");
    ui.caption.replaceChildren();
    setDropTitle("Drop an image here");
  }

  function humanBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function useFile(file) {
    if (!file) return;
    if (!isReady()) {
      showError({ title: "Not searchable", detail: "This collection has no trained checkpoint yet." });
      return;
    }
    if (file.type && !ACCEPTED.includes(file.type)) {
      showError({
        title: "Unsupported file",
        detail: `${file.name || "That file"} is ${file.type}; use a PNG, JPEG, GIF or WebP image.`,
      });
      return;
    }
    clearQuery();
    objectUrl = URL.createObjectURL(file);
    query = { kind: "file", file };
    showQuery(objectUrl, [file.name || "pasted image", humanBytes(file.size)]);
    writeUrl({ push: false });
    runQuery();
  }

  function imageLines(id, label, originalName) {
    const lines = [label ? `Label ${label}` : `Image #${id}`];
    const sub = [`#${id}`];
    if (originalName) sub.push(originalName);
    if (label) lines.push(sub.join(" · "));
    else if (originalName) lines.push(originalName);
    return lines;
  }

  function useStoredImage({ id, imageUrl, lines, push, focusResults }) {
    clearQuery();
    query = { kind: "image", id, imageUrl, lines };
    const src = sameOrigin(imageUrl);
    if (src) showQuery(src, [...lines, "stored image: more like this"]);
    writeUrl({ push });
    runQuery({ focusResults });
  }

  function moreLikeThis(id, focusResults) {
    const hit = hitsById.get(id);
    if (!hit) return;
    useStoredImage({
      id,
      imageUrl: hit.image_url,
      lines: imageLines(id, hitLabel(hit), hit.original_name),
      push: true,
      focusResults,
    });
  }

  /** Deep link ?image=ID (also Back/Forward): the caption comes from GET /images/{id}. */
  async function openStoredImage(id) {
    try {
      const image = await api(`/images/${encodeURIComponent(id)}`);
      // A link may name an image of another collection: follow the image.
      const owner = [...picker.options].find((o) => o.value === image.collection);
      if (owner && picker.value !== owner.value) {
        picker.value = owner.value;
        describeCollection();
      }
      const label = image.metadata && image.metadata.label != null ? String(image.metadata.label) : null;
      useStoredImage({
        id: image.id,
        imageUrl: image.image_url,
        lines: imageLines(image.id, label, image.original_name),
        push: false,
      });
    } catch (error) {
      showError(error);
    }
  }

  // ---- searching -----------------------------------------------------------------------------

  async function runQuery({ focusResults = false } = {}) {
    if (!query) return;
    if (!isReady()) return;
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;

    const name = encodeURIComponent(collectionName());
    const k = currentK();
    let request;
    if (query.kind === "file") {
      const form = new FormData();
      form.append("file", query.file, query.file.name || "pasted.png");
      request = api(`/collections/${name}/search?k=${k}`, {
        method: "POST",
        body: form,
        signal: controller.signal,
      });
    } else {
      request = api(`/collections/${name}/images/${query.id}/similar?k=${k}`, { signal: controller.signal });
    }

    setStatus("Searching…");
    ui.results.setAttribute("aria-busy", "true");
    root.classList.add("busy");
    const started = performance.now();
    try {
      const data = await request;
      const roundTrip = performance.now() - started;
      clearError();
      renderResults(data);
      renderTimings(data.timings_ms || {}, roundTrip);
      if (focusResults) {
        const first = ui.results.querySelector("button");
        if (first) first.focus();
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      showError(error);
      // Old results beside a new query would be misleading.
      hitsById.clear();
      ui.results.replaceChildren();
      ui.timings.hidden = true;
      setStatus("The search failed; see the message above.");
    } finally {
      if (inFlight === controller) {
        inFlight = null;
        ui.results.setAttribute("aria-busy", "false");
        root.classList.remove("busy");
      }
    }
  }

  function hitLabel(hit) {
    if (hit.label !== null && hit.label !== undefined && hit.label !== "") return String(hit.label);
    return null;
  }

  function renderResults(data) {
    hitsById.clear();
    const hits = Array.isArray(data.hits) ? data.hits : [];
    ui.results.replaceChildren(...hits.map(hitItem));
    for (const hit of hits) hitsById.set(hit.id, hit);
    if (hits.length === 0) {
      setStatus("No results: this collection has no indexed images yet.");
    } else {
      const what = data.query_image_id != null ? `image #${data.query_image_id}` : "your image";
      const n = hits.length;
      const shown = n < data.k ? `Only ${n} result${n === 1 ? "" : "s"}` : `The top ${n}`;
      setStatus(`${shown} in ${data.collection} for ${what}. Choose one for more like it.`);
    }
  }

  function hitItem(hit) {
    const label = hitLabel(hit);
    const score = Number(hit.score);
    const scoreText = Number.isFinite(score) ? score.toFixed(3) : "–";
    const describe = label ? `label ${label}` : hit.original_name || `image #${hit.id}`;

    const img = el("img", {
      className: "thumb",
      attrs: { alt: `Result ${hit.rank}: ${describe}`, loading: "lazy", decoding: "async", width: 128, height: 128 },
    });
    const src = thumbnailSrc(hit.thumbnail_url);
    if (src) img.src = src;
    pixelateWhenUpscaled(img);

    const fill = el("span", { className: "bar-fill" });
    fill.style.width = `${Math.min(1, Math.max(0, Number.isFinite(score) ? score : 0)) * 100}%`;

    const button = el(
      "button",
      {
        className: "hit-button",
        attrs: {
          type: "button",
          "data-id": hit.id,
          "aria-label": `Result ${hit.rank}, ${describe}, similarity ${scoreText}. More like this.`,
          title: hit.original_name ? `${hit.original_name} — more like this` : "More like this",
        },
      },
      [
        el("span", { className: "thumb-box" }, [img]),
        el("span", { className: "hit-line" }, [
          el("span", { className: "rank", text: `#${hit.rank}` }),
          el("span", { className: "label", text: label || `#${hit.id}` }),
          el("span", { className: "score", text: scoreText }),
        ]),
        el("span", { className: "bar", attrs: { "aria-hidden": "true" } }, [fill]),
      ],
    );
    return el("li", { className: "hit" }, [button]);
  }

  function renderTimings(timings, roundTrip) {
    const parts = STAGES.filter((s) => typeof timings[s] === "number").map((s) => `${s} ${timings[s].toFixed(1)}`);
    for (const [stage, ms] of Object.entries(timings)) {
      if (!STAGES.includes(stage) && typeof ms === "number") parts.push(`${stage} ${ms.toFixed(1)}`);
    }
    parts.push(`round trip ${roundTrip.toFixed(0)}`);
    ui.timings.textContent = `Timings (ms): ${parts.join(" · ")}`;
    ui.timings.hidden = false;
  }

  // ---- the address bar: ?collection=…&k=…&image=… --------------------------------------------

  function writeUrl({ push }) {
    const params = new URLSearchParams();
    params.set("collection", collectionName());
    if (currentK() !== DEFAULT_K) params.set("k", String(currentK()));
    if (query && query.kind === "image") params.set("image", String(query.id));
    const url = `${window.location.pathname}?${params}`;
    if (url === `${window.location.pathname}${window.location.search}`) return;
    if (push) window.history.pushState(null, "", url);
    else window.history.replaceState(null, "", url);
  }

  function applyUrl() {
    const params = new URLSearchParams(window.location.search);
    const name = params.get("collection");
    if (name && [...picker.options].some((o) => o.value === name)) picker.value = name;
    const k = params.get("k");
    if (k && [...ui.k.options].some((o) => o.value === k)) ui.k.value = k;
    else ui.k.value = String(DEFAULT_K);
    describeCollection();
    const image = params.get("image");
    if (image && /^\d+$/.test(image)) {
      openStoredImage(image);
    } else if (query && query.kind === "image") {
      clearQuery();
      clearResults();
    }
  }

  function clearResults() {
    hitsById.clear();
    ui.results.replaceChildren();
    ui.timings.hidden = true;
    setStatus("Upload an image to see the most similar images of the collection.");
  }

  // ---- input: chooser, drag and drop, paste --------------------------------------------------

  function firstImageFile(files) {
    for (const file of files || []) {
      if (!file.type || file.type.startsWith("image/")) return file;
    }
    return files && files.length ? files[0] : null; // let useFile() say why it is refused
  }

  function handleTransfer(transfer) {
    if (!transfer) return;
    const file = firstImageFile(transfer.files);
    if (file) {
      useFile(file);
      return;
    }
    // A result thumbnail dragged onto the drop zone: search with that stored image.
    const text = transfer.getData("text/uri-list") || transfer.getData("text/plain");
    const match = text && text.match(STORED_IMAGE_URL);
    if (match && sameOrigin(text.trim())) {
      const id = Number(match[1]);
      if (hitsById.has(id)) moreLikeThis(id, false);
      else openStoredImageAndPush(id);
    }
  }

  function openStoredImageAndPush(id) {
    query = { kind: "image", id };
    writeUrl({ push: true });
    openStoredImage(String(id));
  }

  function hasFiles(event) {
    return event.dataTransfer && [...event.dataTransfer.types].some((t) => t === "Files" || t === "text/uri-list");
  }

  ui.file.addEventListener("change", () => {
    useFile(ui.file.files && ui.file.files[0]);
    ui.file.value = ""; // choosing the same file again still fires "change"
  });

  // The whole window accepts a drop, so a near miss never navigates away from the page.
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    if (isReady()) ui.dropzone.classList.add("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = isReady() ? "copy" : "none";
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) ui.dropzone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    ui.dropzone.classList.remove("dragging");
    handleTransfer(event.dataTransfer);
  });

  document.addEventListener("paste", (event) => {
    const data = event.clipboardData;
    if (!data) return;
    let file = firstImageFile(data.files);
    if (!file) {
      for (const item of data.items || []) {
        if (item.kind === "file" && item.type.startsWith("image/")) {
          file = item.getAsFile();
          break;
        }
      }
    }
    if (file) {
      event.preventDefault();
      useFile(file);
    }
  });

  // Results are <button>s, so Enter and Space work like a click.
  ui.results.addEventListener("click", (event) => {
    const button = event.target.closest("button.hit-button");
    if (!button) return;
    // detail is 0 for keyboard activation: keep keyboard users on the new results.
    moreLikeThis(Number(button.dataset.id), event.detail === 0);
  });

  picker.addEventListener("change", () => {
    clearError();
    describeCollection();
    if (query && query.kind === "image") {
      // A stored image belongs to the collection it came from.
      clearQuery();
      clearResults();
    }
    writeUrl({ push: false });
    runQuery();
  });

  ui.k.addEventListener("change", () => {
    writeUrl({ push: false });
    runQuery();
  });

  window.addEventListener("popstate", applyUrl);
  pixelateWhenUpscaled(ui.queryImage);

  applyUrl();
})();
