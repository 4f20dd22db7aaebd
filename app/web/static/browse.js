// The browse page: a paged gallery of a collection with label counts and filters; any image
// opens with its metadata and nearest neighbours. Data reaches the DOM only as text/attributes.
(function () {
  "use strict";

  const C = window.cbir;
  const picker = C && C.collectionPicker();
  if (!picker) return;

  const el = C.el;
  const byId = C.byId;
  const ui = {
    metaFilter: byId("meta-filter"),
    perPage: byId("per-page"),
    chips: byId("label-chips"),
    facetNote: byId("facet-note"),
    status: byId("status"),
    gallery: byId("gallery"),
    first: byId("first-page"),
    prev: byId("prev-page"),
    next: byId("next-page"),
    last: byId("last-page"),
    pageInfo: byId("page-info"),
  };

  const state = { page: 1, label: "", meta: "", total: 0 };
  let request = 0;
  let labelsRequest = 0;

  function perPage() {
    return Number(ui.perPage.value) || 48;
  }

  function pages() {
    return Math.max(1, Math.ceil(state.total / perPage()));
  }

  // ---- labels as filter chips, with counts ---------------------------------------------------

  function chip(text, value, pressed, countText) {
    const button = el("button", {
      className: "chip",
      attrs: { type: "button", "aria-pressed": String(pressed), "data-label": value },
    }, [el("span", { className: "chip-text", text }), el("span", { className: "chip-count", text: countText })]);
    return button;
  }

  async function loadLabels() {
    const mine = ++labelsRequest;
    const name = picker.name();
    const data = await C.loadLabels(name, 60);
    if (mine !== labelsRequest) return;
    const labels = (data && data.labels) || [];
    if (labels.length === 0) {
      ui.chips.replaceChildren();
      ui.facetNote.hidden = true;
      return;
    }
    const chips = [chip("All labels", "", state.label === "", C.count(data.total))];
    for (const { label, count } of labels) chips.push(chip(label, label, state.label === label, C.count(count)));
    if (state.label && !labels.some((l) => l.label === state.label)) chips.push(chip(state.label, state.label, true, ""));
    ui.chips.replaceChildren(...chips);
    const notes = [];
    if (data.distinct > labels.length) notes.push(`the ${labels.length} most common of ${C.count(data.distinct)} labels`);
    if (data.unlabelled) notes.push(`${C.plural(data.unlabelled, "image")} without a label`);
    ui.facetNote.textContent = notes.length ? `Showing ${notes.join("; ")}.` : "";
    ui.facetNote.hidden = notes.length === 0;
  }

  function markChips() {
    for (const button of ui.chips.querySelectorAll("button.chip")) {
      button.setAttribute("aria-pressed", String(button.dataset.label === state.label));
    }
  }

  // ---- the gallery ---------------------------------------------------------------------------

  async function load({ focus = false } = {}) {
    const mine = ++request;
    const name = picker.name();
    const limit = perPage();
    const offset = (state.page - 1) * limit;
    ui.gallery.setAttribute("aria-busy", "true");
    document.body.classList.add("busy");
    let result;
    try {
      const filter = C.filterQuery({ label: state.label, meta: state.meta });
      result = await C.api(`/collections/${encodeURIComponent(name)}/images?offset=${offset}&limit=${limit}${filter}`, {
        withHeaders: true,
      });
    } catch (error) {
      if (mine !== request) return;
      C.showError(error);
      ui.gallery.replaceChildren();
      ui.status.textContent = "The images could not be loaded; see the message above.";
      return;
    } finally {
      if (mine === request) {
        ui.gallery.setAttribute("aria-busy", "false");
        document.body.classList.remove("busy");
      }
    }
    if (mine !== request) return;
    C.clearError();
    const images = Array.isArray(result.body) ? result.body : [];
    state.total = Number(result.headers.get("x-total-count")) || 0;
    if (state.page > pages() && state.total > 0) {
      state.page = pages();
      load({ focus });
      return;
    }
    ui.gallery.replaceChildren(...images.map(tile));
    describe(images.length, offset);
    if (focus) {
      const first = ui.gallery.querySelector("button");
      if (first) first.focus();
    }
  }

  function describe(shown, offset) {
    const filters = [];
    if (state.label) filters.push(`label ${state.label}`);
    if (state.meta) filters.push(state.meta.replace(":", " = "));
    const what = filters.length ? ` with ${filters.join(" and ")}` : "";
    if (state.total === 0) {
      ui.status.textContent = what ? `No image${what} in ${picker.name()}.` : `${picker.name()} has no images yet: import some.`;
    } else {
      ui.status.textContent = `${C.plural(state.total, "image")}${what} · showing ${C.count(offset + 1)}–${C.count(offset + shown)}`;
    }
    ui.pageInfo.textContent = `Page ${C.count(state.page)} of ${C.count(pages())}`;
    ui.first.disabled = ui.prev.disabled = state.page <= 1;
    ui.next.disabled = ui.last.disabled = state.page >= pages();
  }

  function tile(image) {
    const label = C.labelOf(image.metadata);
    const name = image.original_name || "";
    const describeIt = [label ? `label ${label}` : null, `image #${image.id}`, name || null].filter(Boolean).join(", ");
    const button = el(
      "button",
      {
        className: "tile-button",
        attrs: { type: "button", "data-id": image.id, "aria-label": `${describeIt}. Open it with its neighbours.`, title: name || null },
      },
      [
        el("span", { className: "thumb-box" }, [C.thumbnail(image.thumbnail_url, describeIt)]),
        el("span", { className: "tile-line" }, [
          el("span", { className: "label", text: label || name || "no label" }),
          el("span", { className: "rank", text: `#${image.id}` }),
        ]),
      ],
    );
    return el("li", { className: "tile" }, [button]);
  }

  function openImage(id) {
    const collection = picker.name();
    C.openImage(id, {
      neighbours: true,
      actions: [
        {
          label: "Search with this image",
          primary: true,
          href: `/?collection=${encodeURIComponent(collection)}&image=${encodeURIComponent(id)}`,
        },
      ],
    });
  }

  // ---- the address bar: ?collection=…&page=…&label=…&meta=…&limit=… ---------------------------

  function writeUrl(push) {
    const params = new URLSearchParams();
    params.set("collection", picker.name());
    if (state.page > 1) params.set("page", String(state.page));
    if (state.label) params.set("label", state.label);
    if (ui.metaFilter.value.trim()) params.set("meta", ui.metaFilter.value.trim());
    if (perPage() !== 48) params.set("limit", String(perPage()));
    C.writeUrl(params, push);
  }

  function applyUrl() {
    const params = new URLSearchParams(window.location.search);
    const name = params.get("collection");
    if (name && picker.has(name)) picker.element.value = name;
    const page = Number(params.get("page"));
    state.page = Number.isInteger(page) && page >= 1 ? page : 1;
    state.label = params.get("label") || "";
    ui.metaFilter.value = params.get("meta") || "";
    const limit = params.get("limit");
    ui.perPage.value = limit && [...ui.perPage.options].some((o) => o.value === limit) ? limit : "48";
    if (!readMeta()) return;
    loadLabels();
    load();
  }

  function readMeta() {
    try {
      state.meta = C.parseMetaFilter(ui.metaFilter.value) || "";
      return true;
    } catch (error) {
      C.showError(error);
      return false;
    }
  }

  function go(page, focus) {
    state.page = Math.min(Math.max(1, page), pages());
    writeUrl(true);
    load({ focus });
  }

  ui.first.addEventListener("click", () => go(1, false));
  ui.prev.addEventListener("click", () => go(state.page - 1, false));
  ui.next.addEventListener("click", () => go(state.page + 1, false));
  ui.last.addEventListener("click", () => go(pages(), false));

  ui.chips.addEventListener("click", (event) => {
    const button = event.target.closest("button.chip");
    if (!button) return;
    state.label = button.dataset.label || "";
    state.page = 1;
    markChips();
    writeUrl(true);
    load();
  });

  ui.gallery.addEventListener("click", (event) => {
    const button = event.target.closest("button.tile-button");
    if (button) openImage(Number(button.dataset.id));
  });

  picker.element.addEventListener("change", () => {
    C.clearError();
    state.page = 1;
    state.label = "";
    writeUrl(true);
    loadLabels();
    load();
  });

  ui.perPage.addEventListener("change", () => {
    state.page = 1;
    writeUrl(false);
    load();
  });

  byId("controls").addEventListener("submit", (event) => event.preventDefault());
  ui.metaFilter.addEventListener("change", () => {
    if (!readMeta()) return;
    C.clearError();
    state.page = 1;
    writeUrl(true);
    load();
  });

  // Left and right arrow keys turn pages when no field has the focus.
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const target = event.target;
    if (target && (target.closest("input, select, textarea, dialog") || target.isContentEditable)) return;
    if (event.key === "ArrowRight" && state.page < pages()) go(state.page + 1, false);
    if (event.key === "ArrowLeft" && state.page > 1) go(state.page - 1, false);
  });

  window.addEventListener("popstate", applyUrl);
  applyUrl();
})();
