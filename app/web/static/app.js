// The search page: plain JavaScript over the REST API, no build step, no inline code (CSP-ready).
// Anything that comes from data (file names, labels, metadata) reaches the DOM only through
// textContent or attributes; this file never parses HTML strings. Helpers live in common.js.
(function () {
  "use strict";

  const C = window.cbir;
  const root = document.getElementById("app");
  const picker = C && C.collectionPicker();
  if (!root || !picker) return; // the "no collections yet" page has nothing to drive

  const MAX_K = Number(root.dataset.maxK) || 100;
  const DEFAULT_K = 10;
  const STAGES = ["decode", "embed", "filter", "search", "fetch", "total"];
  const ACCEPTED = ["image/png", "image/jpeg", "image/gif", "image/webp"];
  const STORED_IMAGE_URL = /\/api\/v1\/images\/(\d+)\/(?:file|thumbnail)\b/;
  const byId = C.byId;
  const el = C.el;

  const ui = {
    k: byId("k"),
    meta: byId("collection-meta"),
    labelField: byId("label-field"),
    labelFilter: byId("label-filter"),
    metaFilter: byId("meta-filter"),
    file: byId("file"),
    dropzone: byId("dropzone"),
    figure: byId("query-figure"),
    stage: byId("crop-stage"),
    queryImage: byId("query-image"),
    cropBox: byId("crop-box"),
    caption: byId("query-caption"),
    actions: byId("query-actions"),
    cropStart: byId("crop-start"),
    cropApply: byId("crop-apply"),
    cropCancel: byId("crop-cancel"),
    cropHint: byId("crop-hint"),
    idForm: byId("id-form"),
    idInput: byId("image-id"),
    examples: byId("examples"),
    exampleChips: byId("example-chips"),
    examplesSearch: byId("examples-search"),
    examplesClear: byId("examples-clear"),
    timings: byId("timings"),
    status: byId("status"),
    results: byId("results"),
  };

  // The current query: {kind: "file", file} or {kind: "image", id, imageUrl, lines}.
  let query = null;
  let objectUrl = null;
  let inFlight = null; // AbortController of the running request: a newer query cancels it
  let dragDepth = 0;
  let labelRequest = 0; // the newest request for the label filter's choices
  const hitsById = new Map();
  // Search by examples: the chosen examples, each {key, kind: "positive" | "negative", id or file,
  // text}; while `byExamples` is true the searches send them instead of the query.
  let chosen = [];
  let byExamples = false;

  // ---- collection, k and filters -------------------------------------------------------------

  function currentK() {
    const k = Number(ui.k.value);
    return Number.isInteger(k) && k >= 1 ? Math.min(k, MAX_K) : DEFAULT_K;
  }

  function describeCollection() {
    const option = picker.option();
    if (!option) return;
    const d = option.dataset;
    // Versions usually repeat the embedder's name ("tiny-v1"): say it once.
    const version = d.version && !d.version.startsWith(d.embedder) ? `${d.embedder} ${d.version}` : d.version;
    const parts = [version || d.embedder];
    if (d.dim) parts.push(`${d.dim}-d`);
    parts.push(`${C.count(d.indexed)} of ${C.count(d.images)} images indexed`);
    ui.meta.textContent = parts.join(" · ");

    C.describeReadiness(picker);
    const ready = picker.ready();
    ui.file.disabled = !ready;
    ui.idInput.disabled = !ready;
    ui.idForm.querySelector("button").disabled = !ready;
    ui.dropzone.classList.toggle("disabled", !ready);
    ui.dropzone.setAttribute("aria-disabled", String(!ready));
  }

  /** Fill the label filter from the collection's labels (hidden when it has none). `wanted` is
   * selected at once (so a search can use it before the list arrives). */
  async function loadLabelChoices(wanted) {
    const name = picker.name();
    const request = ++labelRequest;
    const placeholder = [el("option", { text: "Any label", attrs: { value: "" } })];
    if (wanted) placeholder.push(el("option", { text: wanted, attrs: { value: wanted } }));
    ui.labelFilter.replaceChildren(...placeholder);
    ui.labelFilter.value = wanted || "";
    if (wanted) ui.labelField.hidden = false;
    const data = await C.loadLabels(name);
    if (request !== labelRequest) return;
    const keep = ui.labelFilter.value;
    const options = [el("option", { text: "Any label", attrs: { value: "" } })];
    for (const { label, count } of (data && data.labels) || []) {
      options.push(el("option", { text: `${label} (${C.count(count)})`, attrs: { value: label } }));
    }
    if (keep && !options.some((o) => o.value === keep)) options.push(el("option", { text: keep, attrs: { value: keep } }));
    ui.labelFilter.replaceChildren(...options);
    ui.labelFilter.value = keep;
    ui.labelField.hidden = options.length <= 1;
  }

  /** The filter as typed, or an error shown to the person (and null). */
  function currentFilter() {
    try {
      return { label: ui.labelFilter.value || null, meta: C.parseMetaFilter(ui.metaFilter.value) };
    } catch (error) {
      C.showError(error);
      ui.metaFilter.focus();
      return null;
    }
  }

  function describeFilter(filter) {
    const parts = [];
    if (filter.label) parts.push(`label ${filter.label}`);
    if (filter.meta) parts.push(filter.meta.replace(":", " = "));
    return parts.length ? ` with ${parts.join(" and ")}` : "";
  }

  // ---- messages ------------------------------------------------------------------------------

  function setStatus(text) {
    ui.status.textContent = text;
  }

  // ---- the query panel -----------------------------------------------------------------------

  function showQuery(src, lines) {
    endCrop();
    ui.queryImage.src = src;
    ui.queryImage.alt = lines[0] ? `Query: ${lines[0]}` : "Query image";
    ui.caption.replaceChildren(
      ...lines.map((line, i) => el("span", { className: i === 0 ? "caption-main" : "caption-sub", text: line })),
    );
    ui.figure.hidden = false;
    ui.actions.hidden = false;
    root.classList.add("has-query");
    setDropTitle("Drop another image here");
  }

  function setDropTitle(text) {
    const title = ui.dropzone.querySelector(".dropzone-title");
    if (title) title.textContent = text;
  }

  function clearQuery() {
    endCrop();
    query = null;
    clearExamples();
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = null;
    ui.figure.hidden = true;
    ui.actions.hidden = true;
    root.classList.remove("has-query");
    ui.queryImage.removeAttribute("src");
    ui.caption.replaceChildren();
    setDropTitle("Drop an image here");
  }

  function useFile(file, { push = false } = {}) {
    if (!file) return;
    if (!picker.ready()) {
      C.showError({ title: "Not searchable", detail: "This collection has no trained checkpoint yet." });
      return;
    }
    if (file.type && !ACCEPTED.includes(file.type)) {
      C.showError({
        title: "Unsupported file",
        detail: `${file.name || "That file"} is ${file.type}; use a PNG, JPEG, GIF or WebP image.`,
      });
      return;
    }
    clearQuery();
    objectUrl = URL.createObjectURL(file);
    query = { kind: "file", file };
    showQuery(objectUrl, [file.name || "pasted image", C.humanBytes(file.size)]);
    writeUrl({ push });
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
    const src = C.sameOrigin(imageUrl);
    if (src) showQuery(src, [...lines, "stored image: more like this"]);
    writeUrl({ push });
    runQuery({ focusResults });
  }

  function moreLikeThis(image, focusResults) {
    useStoredImage({
      id: image.id,
      imageUrl: image.image_url,
      lines: imageLines(image.id, C.labelOf(image.metadata), image.original_name),
      push: true,
      focusResults,
    });
  }

  /** Deep link ?image=ID (also Back/Forward and the id field): the caption comes from GET /images/{id}. */
  async function openStoredImage(id, { push = false } = {}) {
    try {
      const image = await C.api(`/images/${encodeURIComponent(id)}`);
      // A link may name an image of another collection: follow the image.
      if (picker.name() !== image.collection && picker.has(image.collection)) {
        picker.element.value = image.collection;
        describeCollection();
        loadLabelChoices("");
      }
      useStoredImage({
        id: image.id,
        imageUrl: image.image_url,
        lines: imageLines(image.id, C.labelOf(image.metadata), image.original_name),
        push,
      });
    } catch (error) {
      C.showError(error);
    }
  }

  // ---- crop ----------------------------------------------------------------------------------
  // The crop rectangle is kept as fractions of the image (x, y, w, h in 0..1) and drawn over the
  // part of the box that object-fit: contain gives the image.

  let crop = null;
  let drag = null;

  function contentRect() {
    const img = ui.queryImage;
    const w = img.clientWidth;
    const h = img.clientHeight;
    const nw = img.naturalWidth || w;
    const nh = img.naturalHeight || h;
    const scale = Math.min(w / nw, h / nh);
    const cw = nw * scale;
    const ch = nh * scale;
    return { left: img.offsetLeft + (w - cw) / 2, top: img.offsetTop + (h - ch) / 2, width: cw, height: ch };
  }

  function drawCrop() {
    if (!crop) return;
    const r = contentRect();
    const box = ui.cropBox;
    box.style.left = `${r.left + crop.x * r.width}px`;
    box.style.top = `${r.top + crop.y * r.height}px`;
    box.style.width = `${crop.w * r.width}px`;
    box.style.height = `${crop.h * r.height}px`;
  }

  function startCrop() {
    if (!query || !ui.queryImage.naturalWidth) return;
    crop = { x: 0.1, y: 0.1, w: 0.8, h: 0.8 };
    root.classList.add("cropping");
    ui.cropBox.hidden = false;
    ui.cropStart.hidden = true;
    ui.cropApply.hidden = false;
    ui.cropCancel.hidden = false;
    ui.cropHint.hidden = false;
    drawCrop();
    ui.cropBox.focus();
  }

  function endCrop() {
    crop = null;
    drag = null;
    root.classList.remove("cropping");
    ui.cropBox.hidden = true;
    ui.cropStart.hidden = false;
    ui.cropApply.hidden = true;
    ui.cropCancel.hidden = true;
    ui.cropHint.hidden = true;
  }

  function clamp(value, low, high) {
    return Math.min(high, Math.max(low, value));
  }

  function pointerFraction(event) {
    const r = contentRect();
    const stage = ui.stage.getBoundingClientRect();
    return {
      x: clamp((event.clientX - stage.left - r.left) / r.width, 0, 1),
      y: clamp((event.clientY - stage.top - r.top) / r.height, 0, 1),
    };
  }

  ui.stage.addEventListener("pointerdown", (event) => {
    if (!crop) return;
    event.preventDefault();
    const at = pointerFraction(event);
    const inside = at.x > crop.x && at.x < crop.x + crop.w && at.y > crop.y && at.y < crop.y + crop.h;
    drag = inside ? { mode: "move", from: at, start: { ...crop } } : { mode: "draw", from: at };
    ui.stage.setPointerCapture(event.pointerId);
  });

  ui.stage.addEventListener("pointermove", (event) => {
    if (!crop || !drag) return;
    const at = pointerFraction(event);
    if (drag.mode === "move") {
      crop.x = clamp(drag.start.x + at.x - drag.from.x, 0, 1 - crop.w);
      crop.y = clamp(drag.start.y + at.y - drag.from.y, 0, 1 - crop.h);
    } else {
      crop = {
        x: Math.min(at.x, drag.from.x),
        y: Math.min(at.y, drag.from.y),
        w: Math.max(Math.abs(at.x - drag.from.x), 0.02),
        h: Math.max(Math.abs(at.y - drag.from.y), 0.02),
      };
      crop.w = Math.min(crop.w, 1 - crop.x);
      crop.h = Math.min(crop.h, 1 - crop.y);
    }
    drawCrop();
  });

  ui.stage.addEventListener("pointerup", () => {
    drag = null;
  });

  ui.cropBox.addEventListener("keydown", (event) => {
    if (!crop) return;
    const step = 0.02;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (event.key === "Enter") {
      event.preventDefault();
      applyCrop();
      return;
    }
    if (event.key === "Escape") {
      event.preventDefault();
      endCrop();
      ui.cropStart.focus();
      return;
    }
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    if (event.shiftKey) {
      crop.w = clamp(crop.w + move[0], 0.04, 1 - crop.x);
      crop.h = clamp(crop.h + move[1], 0.04, 1 - crop.y);
    } else {
      crop.x = clamp(crop.x + move[0], 0, 1 - crop.w);
      crop.y = clamp(crop.y + move[1], 0, 1 - crop.h);
    }
    drawCrop();
  });

  function applyCrop() {
    if (!crop || !query) return;
    const img = ui.queryImage;
    const sx = Math.round(crop.x * img.naturalWidth);
    const sy = Math.round(crop.y * img.naturalHeight);
    const sw = Math.max(1, Math.round(crop.w * img.naturalWidth));
    const sh = Math.max(1, Math.round(crop.h * img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = sw;
    canvas.height = sh;
    canvas.getContext("2d").drawImage(img, sx, sy, sw, sh, 0, 0, sw, sh);
    const base = query.kind === "file" ? (query.file.name || "image").replace(/\.[^.]*$/, "") : `image-${query.id}`;
    canvas.toBlob((blob) => {
      if (!blob) {
        C.showError({ title: "Crop failed", detail: "The browser could not cut the image." });
        return;
      }
      useFile(new File([blob], `${base} (crop ${sw}×${sh}).png`, { type: "image/png" }), { push: true });
    }, "image/png");
  }

  ui.cropStart.addEventListener("click", startCrop);
  ui.cropApply.addEventListener("click", applyCrop);
  ui.cropCancel.addEventListener("click", () => {
    endCrop();
    ui.cropStart.focus();
  });
  window.addEventListener("resize", drawCrop);

  // ---- searching -----------------------------------------------------------------------------

  async function runQuery({ focusResults = false } = {}) {
    if (!query || !picker.ready()) return;
    const filter = currentFilter();
    if (!filter) return;
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;

    const name = encodeURIComponent(picker.name());
    const k = currentK();
    const filterText = C.filterQuery(filter);
    let request;
    if (byExamples) {
      request = C.api(`/collections/${name}/search?k=${k}${filterText}`, {
        method: "POST",
        body: examplesForm(),
        signal: controller.signal,
      });
    } else if (query.kind === "file") {
      const form = new FormData();
      form.append("file", query.file, query.file.name || "pasted.png");
      request = C.api(`/collections/${name}/search?k=${k}${filterText}`, {
        method: "POST",
        body: form,
        signal: controller.signal,
      });
    } else {
      request = C.api(`/collections/${name}/images/${query.id}/similar?k=${k}${filterText}`, {
        signal: controller.signal,
      });
    }

    setStatus("Searching…");
    ui.results.setAttribute("aria-busy", "true");
    root.classList.add("busy");
    const started = performance.now();
    try {
      const data = await request;
      const roundTrip = performance.now() - started;
      C.clearError();
      renderResults(data, filter);
      renderTimings(data.timings_ms || {}, roundTrip);
      if (focusResults) {
        const first = ui.results.querySelector("button");
        if (first) first.focus();
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      C.showError(error);
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

  function renderResults(data, filter) {
    hitsById.clear();
    const hits = Array.isArray(data.hits) ? data.hits : [];
    const shared = C.sharedKeys(hits.map((h) => h.metadata));
    ui.results.replaceChildren(...hits.map((hit) => hitItem(hit, shared)));
    for (const hit of hits) hitsById.set(hit.id, hit);
    const filtered = describeFilter(filter);
    if (hits.length === 0) {
      setStatus(filtered ? `No image${filtered} in ${data.collection}.` : "No results: this collection has no indexed images yet.");
    } else {
      const what = data.query
        ? describeExamples(data.query)
        : data.query_image_id != null
          ? `image #${data.query_image_id}`
          : "your image";
      const n = hits.length;
      const shown = n < data.k ? `Only ${n} result${n === 1 ? "" : "s"}` : `The top ${n}`;
      setStatus(
        `${shown}${filtered} in ${data.collection} for ${what}. Choose one to see it and find more like it, ` +
          "or mark results with + and − to search by examples.",
      );
    }
  }

  function hitItem(hit, shared) {
    const label = hitLabel(hit);
    const score = Number(hit.score);
    const scoreText = Number.isFinite(score) ? score.toFixed(3) : "–";
    const describe = label ? `label ${label}` : hit.original_name || `image #${hit.id}`;
    const summary = C.metaSummary(hit.metadata, 2, shared);

    const button = el(
      "button",
      {
        className: "hit-button",
        attrs: {
          type: "button",
          "data-id": hit.id,
          "aria-label": `Result ${hit.rank}, ${describe}, similarity ${scoreText}. Open it.`,
          title: hit.original_name ? `${hit.original_name}: open it` : "Open it",
        },
      },
      [
        el("span", { className: "thumb-box" }, [
          C.thumbnail(hit.thumbnail_url, `Result ${hit.rank}: ${describe}`),
        ]),
        el("span", { className: "hit-line" }, [
          el("span", { className: "rank", text: `#${hit.rank}` }),
          el("span", { className: "label", text: label || `#${hit.id}` }),
          el("span", { className: "score", text: scoreText }),
        ]),
        C.scoreBar(score),
        summary ? el("span", { className: "hit-meta", text: summary, attrs: { title: summary } }) : null,
      ],
    );
    const mark = (kind, sign, what) =>
      el("button", {
        className: `example-add ${kind}`,
        text: sign,
        attrs: {
          type: "button",
          "data-id": hit.id,
          "data-kind": kind,
          "aria-label": `Add result ${hit.rank} as a ${kind} example (${what})`,
          title: what,
        },
      });
    const marks = el("span", { className: "hit-examples" }, [
      mark("positive", "+", "more like this"),
      mark("negative", "−", "less like this"),
    ]);
    return el("li", { className: "hit" }, [button, marks]);
  }

  // ---- search by examples --------------------------------------------------------------------

  function describeExamples(combined) {
    const p = combined.positive.length;
    const n = combined.negative.length;
    const parts = [`${p} positive`];
    if (n) parts.push(`${n} negative`);
    return `${p + n} example${p + n === 1 ? "" : "s"} (${parts.join(", ")})`;
  }

  function examplesForm() {
    const form = new FormData();
    for (const example of chosen) {
      if (example.file) form.append(`${example.kind}_file`, example.file, example.file.name || "pasted.png");
      else form.append(example.kind, String(example.id));
    }
    return form;
  }

  function renderExamples() {
    ui.exampleChips.replaceChildren(
      ...chosen.map((example) =>
        el("li", { className: `chip example-chip ${example.kind}` }, [
          el("span", {
            className: "example-sign",
            text: example.kind === "positive" ? "+" : "−",
            attrs: { "aria-hidden": "true" },
          }),
          el("span", { className: "chip-text", text: example.text }),
          el("button", {
            className: "chip-remove",
            text: "×",
            attrs: {
              type: "button",
              "data-key": example.key,
              "aria-label": `Remove the ${example.kind} example ${example.text}`,
            },
          }),
        ]),
      ),
    );
    ui.examples.hidden = chosen.length === 0;
    ui.examplesSearch.disabled = !chosen.some((example) => example.kind === "positive");
    if (chosen.length === 0) byExamples = false;
  }

  function choose(kind, example) {
    chosen = chosen.filter((other) => other.key !== example.key);
    chosen.push({ ...example, kind });
    renderExamples();
  }

  /** A result as an example; the first one brings the query along as a positive example. */
  function addExample(kind, hit) {
    if (!hit) return;
    if (chosen.length === 0 && query && query.kind === "image") {
      const line = query.lines[0];
      const text = line.startsWith("Label ") ? `${line.slice("Label ".length)} · #${query.id}` : `#${query.id}`;
      choose("positive", { key: `id:${query.id}`, id: query.id, text });
    } else if (chosen.length === 0 && query && query.kind === "file") {
      choose("positive", { key: "file", file: query.file, text: query.file.name || "your image" });
    }
    const label = hitLabel(hit);
    choose(kind, { key: `id:${hit.id}`, id: hit.id, text: label ? `${label} · #${hit.id}` : `#${hit.id}` });
  }

  function clearExamples() {
    chosen = [];
    byExamples = false;
    renderExamples();
  }

  ui.exampleChips.addEventListener("click", (event) => {
    const remove = event.target.closest("button.chip-remove");
    if (!remove) return;
    chosen = chosen.filter((example) => example.key !== remove.dataset.key);
    renderExamples();
    ui.examplesSearch.focus();
  });
  ui.examplesSearch.addEventListener("click", () => {
    byExamples = true;
    runQuery({ focusResults: true });
  });
  ui.examplesClear.addEventListener("click", () => {
    const was = byExamples;
    clearExamples();
    if (was) runQuery();
  });

  function renderTimings(timings, roundTrip) {
    const parts = STAGES.filter((s) => typeof timings[s] === "number").map((s) => `${s} ${timings[s].toFixed(1)}`);
    for (const [stage, ms] of Object.entries(timings)) {
      if (!STAGES.includes(stage) && typeof ms === "number") parts.push(`${stage} ${ms.toFixed(1)}`);
    }
    parts.push(`round trip ${roundTrip.toFixed(0)}`);
    ui.timings.textContent = `Timings (ms): ${parts.join(" · ")}`;
    ui.timings.hidden = false;
  }

  // ---- the address bar: ?collection=…&k=…&image=…&label=…&meta=… -----------------------------

  function writeUrl({ push }) {
    const params = new URLSearchParams();
    params.set("collection", picker.name());
    if (currentK() !== DEFAULT_K) params.set("k", String(currentK()));
    if (ui.labelFilter.value) params.set("label", ui.labelFilter.value);
    if (ui.metaFilter.value.trim()) params.set("meta", ui.metaFilter.value.trim());
    if (query && query.kind === "image") params.set("image", String(query.id));
    C.writeUrl(params, push);
  }

  function applyUrl() {
    const params = new URLSearchParams(window.location.search);
    const name = params.get("collection");
    if (name && picker.has(name)) picker.element.value = name;
    const k = params.get("k");
    if (k && [...ui.k.options].some((o) => o.value === k)) ui.k.value = k;
    else ui.k.value = String(DEFAULT_K);
    ui.metaFilter.value = params.get("meta") || "";
    describeCollection();
    loadLabelChoices(params.get("label") || "");
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

  // ---- input: chooser, drag and drop, paste, id ----------------------------------------------

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
    if (match && C.sameOrigin(text.trim())) openStoredImage(match[1], { push: true });
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
    if (picker.ready()) ui.dropzone.classList.add("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = picker.ready() ? "copy" : "none";
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

  ui.idForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const id = ui.idInput.value.trim();
    if (!/^\d+$/.test(id)) {
      C.showError({ title: "Image id", detail: "An image id is a whole number, for example 1234." });
      ui.idInput.focus();
      return;
    }
    openStoredImage(id, { push: true });
  });

  // Results are <button>s, so Enter and Space work like a click: the dialog opens on the image.
  ui.results.addEventListener("click", (event) => {
    const mark = event.target.closest("button.example-add");
    if (mark) {
      addExample(mark.dataset.kind, hitsById.get(Number(mark.dataset.id)));
      return;
    }
    const button = event.target.closest("button.hit-button");
    if (!button) return;
    const id = Number(button.dataset.id);
    const hit = hitsById.get(id);
    // detail is 0 for keyboard activation: keep keyboard users on the new results.
    const keyboard = event.detail === 0;
    C.openImage(id, {
      hit,
      actions: [{ label: "More like this", primary: true, onClick: (image) => moreLikeThis(image, keyboard) }],
    });
  });

  picker.element.addEventListener("change", () => {
    C.clearError();
    describeCollection();
    loadLabelChoices("");
    clearExamples(); // stored examples belong to the collection they came from
    if (query && query.kind === "image") {
      // A stored image belongs to the collection it came from.
      clearQuery();
      clearResults();
    }
    writeUrl({ push: false });
    runQuery();
  });

  for (const control of [ui.k, ui.labelFilter]) {
    control.addEventListener("change", () => {
      writeUrl({ push: false });
      runQuery();
    });
  }

  // A typed filter applies on Enter or when the field is left.
  byId("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    writeUrl({ push: false });
    runQuery();
  });
  ui.metaFilter.addEventListener("change", () => {
    C.clearError();
    writeUrl({ push: false });
    runQuery();
  });

  window.addEventListener("popstate", applyUrl);
  C.pixelateWhenUpscaled(ui.queryImage);

  applyUrl();
})();
