// Shared by every cbir page: plain JavaScript over the REST API, no build step, no inline code
// (CSP-ready). Anything that comes from data (file names, labels, metadata) reaches the DOM only
// through textContent or attributes; no script here parses HTML strings.
(function () {
  "use strict";

  const root = document.getElementById("app");
  const API = (root && root.dataset.api) || "/api/v1";
  const SVG_NS = "http://www.w3.org/2000/svg";

  function byId(id) {
    return document.getElementById(id);
  }

  /** A new element; `text` goes in as textContent, `attrs` as attributes. */
  function el(tag, { className, text, attrs } = {}, children = []) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null && value !== false) node.setAttribute(name, String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  /** A new SVG element with attributes. */
  function svg(tag, attrs = {}, children = []) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null) node.setAttribute(name, String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  /** Only same-origin URLs from the API become image sources or links. */
  function sameOrigin(url) {
    try {
      const parsed = new URL(url, window.location.href);
      return parsed.origin === window.location.origin ? parsed.href : null;
    } catch {
      return null;
    }
  }

  function thumbnailSrc(url, size) {
    const src = sameOrigin(url);
    if (!src) return null;
    const parsed = new URL(src);
    parsed.searchParams.set("size", String(size || (window.devicePixelRatio > 1.5 ? 256 : 128)));
    return parsed.href;
  }

  function imageUrls(id) {
    return { file: `${API}/images/${id}/file`, thumbnail: `${API}/images/${id}/thumbnail` };
  }

  // Small images (MNIST is 28x28) are scaled up with crisp pixels; large ones are smoothed.
  function pixelateWhenUpscaled(img) {
    const check = () => {
      if (!img.naturalWidth || !img.naturalHeight || !img.clientWidth) return;
      // object-fit: contain draws the image at this scale inside its box.
      const scale = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
      img.classList.toggle("pixelated", scale > 1);
    };
    img.addEventListener("load", check);
    if (img.complete) check();
  }

  function count(n) {
    return Number(n || 0).toLocaleString("en");
  }

  function plural(n, word, many) {
    return `${count(n)} ${n === 1 ? word : many || `${word}s`}`;
  }

  function duration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "–";
    if (seconds < 60) return `${Math.max(1, Math.round(seconds))} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  /** "3 minutes ago" for an ISO time (the server's clock and ours agree well enough here). */
  function ago(iso) {
    const then = Date.parse(iso && !/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? `${iso}Z` : iso);
    if (!Number.isFinite(then)) return "";
    const seconds = Math.max(0, (Date.now() - then) / 1000);
    if (seconds < 45) return "just now";
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }

  function localTime(iso) {
    const then = new Date(iso && !/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? `${iso}Z` : iso);
    return Number.isFinite(then.getTime()) ? then.toLocaleString() : String(iso || "");
  }

  // ---- the API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    /** ``problem``: the problem+json body, whose extension members (``fits_sample`` of an
     *  ``over_budget``) a page may act on; null when the body was not JSON. */
    constructor(title, detail, status, problem = null) {
      super(detail);
      this.title = title;
      this.detail = detail;
      this.status = status;
      this.problem = problem;
      this.code = (problem && problem.code) || "";
    }
  }

  // ---- the API key (X-API-Key), kept in this browser's localStorage ------------------------------

  const KEY_STORE = "cbir.apiKey";

  function apiKey() {
    try {
      return window.localStorage.getItem(KEY_STORE) || "";
    } catch {
      return ""; // storage disabled: no key
    }
  }

  function setupApiKey() {
    const input = byId("api-key");
    if (!input) return;
    input.value = apiKey();
    input.addEventListener("change", () => {
      try {
        const value = input.value.trim();
        if (value) window.localStorage.setItem(KEY_STORE, value);
        else window.localStorage.removeItem(KEY_STORE);
      } catch {
        // storage disabled: the key lasts until the page is left
      }
    });
  }

  /** Open the key field after a 401 or 403, so the fix is one paste away. */
  function askForKey() {
    const box = byId("api-key-box");
    if (!box) return;
    box.open = true;
    const input = byId("api-key");
    if (input) input.focus();
  }

  /** JSON from the API; failures become an ApiError carrying the problem's title and detail.
   * `init.json` is sent as a JSON body. Returns {body, headers} when `init.withHeaders`. */
  async function api(path, init = {}) {
    const { json, withHeaders, ...rest } = init;
    const headers = { accept: "application/json" };
    const keyInput = byId("api-key");
    const key = keyInput ? keyInput.value.trim() : apiKey();
    if (key) headers["x-api-key"] = key;
    if (json !== undefined) {
      headers["content-type"] = "application/json";
      rest.body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(API + path, { ...rest, headers });
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
      if (body && (body.code === "unauthorized" || body.code === "forbidden")) askForKey();
      throw new ApiError(title, String(detail), response.status, body);
    }
    return withHeaders ? { body, headers: response.headers } : body;
  }

  // ---- messages --------------------------------------------------------------------------------

  function showError(error, box) {
    const target = box || byId("alert");
    if (!target) return;
    target.replaceChildren();
    if (error && error.title) target.append(el("strong", { text: `${error.title}:` }), " ");
    target.append((error && error.detail) || String(error));
    target.hidden = false;
  }

  function clearError(box) {
    const target = box || byId("alert");
    if (!target) return;
    target.hidden = true;
    target.replaceChildren();
  }

  // ---- collections and filters -----------------------------------------------------------------

  /** The collection <select> of the page: its value, option data, and "ready" (searchable). */
  function collectionPicker() {
    const picker = byId("collection");
    if (!picker) return null;
    return {
      element: picker,
      name: () => picker.value,
      option: () => picker.selectedOptions[0] || null,
      ready: () => {
        const option = picker.selectedOptions[0];
        return Boolean(option && option.dataset.ready === "true");
      },
      has: (name) => [...picker.options].some((o) => o.value === name && !o.disabled),
    };
  }

  /** Show the "cannot be searched" notice (and its command) for an unready collection. */
  function describeReadiness(picker) {
    const notice = byId("not-ready");
    const option = picker.option();
    if (!notice || !option) return;
    notice.hidden = picker.ready();
    const code = notice.querySelector("code");
    if (code) code.textContent = `cbir train ${option.dataset.embedder} --collection ${option.value}`;
  }

  /** "key=value" or "key:value" typed by a person -> the API's "key:value", or null if empty.
   * Throws ApiError-like objects for a missing separator or key. */
  function parseMetaFilter(text) {
    const raw = String(text || "").trim();
    if (!raw) return null;
    const at = raw.search(/[=:]/);
    if (at <= 0) {
      throw new ApiError("Metadata filter", `Write it as key=value, for example split=train (got “${raw}”).`, 0);
    }
    const key = raw.slice(0, at).trim();
    const value = raw.slice(at + 1).trim();
    if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/.test(key)) {
      throw new ApiError("Metadata filter", `“${key}” is not a metadata key: use letters, digits, “_”, “.” or “-”.`, 0);
    }
    return `${key}:${value}`;
  }

  /** Query-string pairs of a filter: {label, meta} -> "&label=…&meta=…" (each encoded). */
  function filterQuery({ label, meta } = {}) {
    const params = new URLSearchParams();
    if (label) params.set("label", label);
    if (meta) params.append("meta", meta);
    const text = params.toString();
    return text ? `&${text}` : "";
  }

  /** The labels of a collection with counts (GET /collections/{name}/labels), or null. */
  async function loadLabels(name, limit = 100) {
    try {
      return await api(`/collections/${encodeURIComponent(name)}/labels?limit=${limit}`);
    } catch {
      return null; // filters are an extra: the page works without them
    }
  }

  function labelOf(metadata) {
    const value = metadata && metadata.label;
    return value === null || value === undefined || value === "" ? null : String(value);
  }

  function formatValue(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  /** A short line of the metadata besides the label: "split train · index 123"; keys in `skip`
   * (e.g. the same for every result on the page) are left out. */
  function metaSummary(metadata, max = 2, skip = new Set()) {
    const parts = [];
    for (const [key, value] of Object.entries(metadata || {})) {
      if (key === "label" || skip.has(key)) continue;
      parts.push(`${key} ${formatValue(value)}`);
      if (parts.length >= max) break;
    }
    return parts.join(" · ");
  }

  /** A <dl> of every metadata entry (keys and values as text). */
  function metadataList(metadata) {
    const list = el("dl", { className: "meta-list" });
    const entries = Object.entries(metadata || {});
    if (entries.length === 0) list.append(el("div", {}, [el("dt", { text: "metadata" }), el("dd", { text: "none" })]));
    for (const [key, value] of entries) {
      list.append(el("div", {}, [el("dt", { text: key }), el("dd", { text: formatValue(value) })]));
    }
    return list;
  }

  /** Metadata keys with one and the same value on every item (they tell results apart not at all). */
  function sharedKeys(metadatas) {
    const shared = new Set();
    if (metadatas.length < 2) return shared;
    for (const [key, value] of Object.entries(metadatas[0] || {})) {
      const text = formatValue(value);
      if (metadatas.every((m) => m && key in m && formatValue(m[key]) === text)) shared.add(key);
    }
    return shared;
  }

  /** Put a page's state in the address bar: a new history entry with ``push``, else in place. */
  function writeUrl(params, push) {
    const url = `${window.location.pathname}?${params}`;
    if (url === `${window.location.pathname}${window.location.search}`) return;
    if (push) window.history.pushState(null, "", url);
    else window.history.replaceState(null, "", url);
  }

  function humanBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  /** A similarity bar: the cosine from 0 to 1 (negative scores show an empty bar). */
  function scoreBar(score) {
    const fill = el("span", { className: "bar-fill" });
    const value = Number.isFinite(score) ? score : 0;
    fill.style.width = `${Math.min(1, Math.max(0, value)) * 100}%`;
    return el("span", { className: "bar", attrs: { "aria-hidden": "true" } }, [fill]);
  }

  /** A thumbnail <img> of a stored image (lazy, crisp when scaled up). */
  function thumbnail(url, alt, size) {
    const img = el("img", {
      className: "thumb",
      attrs: { alt, loading: "lazy", decoding: "async", width: 128, height: 128 },
    });
    const src = thumbnailSrc(url, size);
    if (src) img.src = src;
    pixelateWhenUpscaled(img);
    return img;
  }

  // ---- the image dialog: an image with its metadata, "more like this" and its neighbours -------

  let dialog = null;
  let dialogRequest = 0;

  function buildDialog() {
    const box = el("dialog", { className: "detail", attrs: { "aria-labelledby": "detail-title" } });
    const close = el("button", {
      className: "icon-button",
      text: "×",
      attrs: { type: "button", "aria-label": "Close", title: "Close (Esc)" },
    });
    close.addEventListener("click", () => box.close());
    box.addEventListener("click", (event) => {
      if (event.target === box) box.close(); // a click on the backdrop
    });
    box.addEventListener("close", () => {
      const returnTo = box.returnFocusTo;
      box.returnFocusTo = null;
      if (returnTo && document.contains(returnTo)) returnTo.focus();
    });
    box.append(
      el("div", { className: "detail-body" }, [
        el("header", { className: "detail-head" }, [el("h2", { attrs: { id: "detail-title" }, text: "Image" }), close]),
        el("div", { className: "detail-content" }),
      ]),
    );
    document.body.append(box);
    return box;
  }

  /**
   * Open the dialog for stored image `id`.
   * options: hit (a search hit: rank and score), actions ([{label, primary, href | onClick}]),
   * neighbours (show its nearest neighbours; a click opens that one), collection, filter.
   */
  async function openImage(id, options = {}) {
    dialog = dialog || buildDialog();
    const content = dialog.querySelector(".detail-content");
    const title = dialog.querySelector("#detail-title");
    const request = ++dialogRequest;
    if (!dialog.open) {
      dialog.returnFocusTo = document.activeElement;
      dialog.showModal();
    }
    title.textContent = `Image #${id}`;
    content.replaceChildren(el("p", { className: "status", text: "Loading…" }));
    let image;
    try {
      image = await api(`/images/${encodeURIComponent(id)}`);
    } catch (error) {
      if (request !== dialogRequest) return;
      content.replaceChildren(el("p", { className: "alert", text: `${error.title || "Error"}: ${error.detail || error}` }));
      return;
    }
    if (request !== dialogRequest) return;
    const label = labelOf(image.metadata);
    title.textContent = label ? `Label ${label} · #${image.id}` : `Image #${image.id}`;

    const big = el("img", {
      className: "detail-image",
      attrs: { alt: `Image #${image.id}${label ? `, label ${label}` : ""}${image.original_name ? `, ${image.original_name}` : ""}` },
    });
    const src = sameOrigin(image.image_url);
    if (src) big.src = src;
    pixelateWhenUpscaled(big);

    const facts = el("dl", { className: "meta-list facts" });
    const fact = (name, value, extra) =>
      facts.append(el("div", {}, [el("dt", { text: name }), el("dd", { text: value }, extra ? [extra] : [])]));
    if (options.hit) {
      const score = Number(options.hit.score);
      fact("rank", `#${options.hit.rank}`);
      fact("similarity", Number.isFinite(score) ? score.toFixed(3) : "–", scoreBar(score));
    }
    fact("file", image.original_name || "–");
    fact("size", `${image.width} × ${image.height} ${image.format} · ${humanBytes(image.byte_size)}`);
    fact("collection", image.collection);
    fact("added", localTime(image.created_at));

    const actions = el("div", { className: "button-row" });
    for (const action of options.actions || []) {
      if (action.href) {
        actions.append(el("a", { className: `button${action.primary ? " primary" : ""}`, text: action.label, attrs: { href: action.href } }));
      } else {
        const button = el("button", { className: `button${action.primary ? " primary" : ""}`, text: action.label, attrs: { type: "button" } });
        button.addEventListener("click", () => {
          dialog.returnFocusTo = null;
          dialog.close();
          action.onClick(image);
        });
        actions.append(button);
      }
    }
    if (src) {
      actions.append(el("a", { className: "button", text: "Full size", attrs: { href: src, target: "_blank", rel: "noopener" } }));
    }

    const info = el("div", { className: "detail-info" }, [
      facts,
      el("h3", { className: "detail-subtitle", text: "Metadata" }),
      metadataList(image.metadata),
      actions,
    ]);
    const parts = [el("div", { className: "detail-main" }, [el("figure", { className: "detail-figure" }, [big]), info])];
    let strip = null;
    if (options.neighbours) {
      strip = el("ol", { className: "strip", attrs: { "aria-busy": "true" } });
      parts.push(
        el("section", { className: "detail-neighbours", attrs: { "aria-label": "Nearest neighbours" } }, [
          el("h3", { className: "detail-subtitle", text: "Nearest neighbours" }),
          strip,
        ]),
      );
    }
    content.replaceChildren(...parts);
    const first = actions.querySelector("a, button");
    if (first) first.focus();
    if (strip) loadNeighbours(image, strip, options, request);
  }

  async function loadNeighbours(image, strip, options, request) {
    let data;
    try {
      data = await api(`/collections/${encodeURIComponent(image.collection)}/images/${image.id}/similar?k=8`);
    } catch (error) {
      if (request !== dialogRequest) return;
      strip.replaceChildren(el("li", { className: "hint", text: error.status === 409 ? "This collection cannot be searched yet." : `${error.detail || error}` }));
      strip.setAttribute("aria-busy", "false");
      return;
    }
    if (request !== dialogRequest) return;
    strip.setAttribute("aria-busy", "false");
    const hits = Array.isArray(data.hits) ? data.hits : [];
    if (hits.length === 0) {
      strip.replaceChildren(el("li", { className: "hint", text: "No neighbours yet." }));
      return;
    }
    strip.replaceChildren(
      ...hits.map((hit) => {
        const label = labelOf(hit.metadata) || hit.label;
        const score = Number(hit.score);
        const button = el(
          "button",
          {
            className: "strip-button",
            attrs: {
              type: "button",
              "aria-label": `Neighbour ${hit.rank}: ${label ? `label ${label}` : `image #${hit.id}`}, similarity ${score.toFixed(3)}`,
            },
          },
          [
            el("span", { className: "thumb-box" }, [thumbnail(hit.thumbnail_url, "", 128)]),
            el("span", { className: "strip-line" }, [
              el("span", { className: "label", text: label || `#${hit.id}` }),
              el("span", { className: "score", text: score.toFixed(2) }),
            ]),
          ],
        );
        button.addEventListener("click", () => openImage(hit.id, options));
        return el("li", {}, [button]);
      }),
    );
  }

  setupApiKey();

  window.cbir = {
    apiKey,
    writeUrl,
    API,
    ApiError,
    ago,
    api,
    byId,
    clearError,
    collectionPicker,
    count,
    describeReadiness,
    duration,
    el,
    filterQuery,
    formatValue,
    humanBytes,
    imageUrls,
    labelOf,
    loadLabels,
    localTime,
    metaSummary,
    metadataList,
    openImage,
    parseMetaFilter,
    pixelateWhenUpscaled,
    plural,
    sameOrigin,
    scoreBar,
    sharedKeys,
    showError,
    svg,
    thumbnail,
    thumbnailSrc,
  };
})();
