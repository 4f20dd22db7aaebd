// The map page: a sample of the collection's codes projected to 2-D, drawn as an SVG scatter
// plot coloured by label. Hover (or arrow keys) shows a point's thumbnail; click (or Enter)
// searches with it. Labels reach the DOM only as text.
(function () {
  "use strict";

  const C = window.cbir;
  const picker = C && C.collectionPicker();
  if (!picker) return;
  const el = C.el;
  const byId = C.byId;
  const PALETTE = 10; // colours in style.css (.c0 … .c9); rarer labels share "other"
  const W = 1000;
  const PHONE = window.matchMedia("(max-width: 599px)"); // a square plot there (style.css agrees)
  let H = 680;
  const PAD = 24;
  const ui = {
    method: byId("method"),
    sample: byId("sample"),
    chart: byId("map-chart"),
    tip: byId("map-tip"),
    status: byId("map-status"),
    legend: byId("legend"),
    focus: byId("map-focus"),
  };
  let points = [];
  let focused = -1;
  let ring = null;
  let plot = null;
  let request = 0;

  function naturalCompare(a, b) {
    return String(a).localeCompare(String(b), "en", { numeric: true });
  }

  /** Colour classes by label: the 10 most common labels get a colour each (in natural order). */
  function colourClasses(data) {
    const counts = new Map();
    for (const p of data) counts.set(p.label, (counts.get(p.label) || 0) + 1);
    const labelled = [...counts.entries()].filter(([label]) => label !== null);
    const common = labelled.sort((a, b) => b[1] - a[1]).slice(0, PALETTE).map(([label]) => label).sort(naturalCompare);
    const classes = new Map(common.map((label, i) => [label, `c${i}`]));
    const legend = common.map((label) => ({ label, cls: classes.get(label), count: counts.get(label) }));
    const others = labelled.filter(([label]) => !classes.has(label)).reduce((n, [, c]) => n + c, 0);
    if (others) legend.push({ label: null, text: "other labels", cls: "other", count: others });
    if (counts.has(null)) legend.push({ label: null, text: "no label", cls: "none", count: counts.get(null) });
    return { classOf: (label) => (label === null ? "none" : classes.get(label) || "other"), legend };
  }

  function draw(data) {
    H = PHONE.matches ? 1000 : 680;
    points = data.points;
    focused = -1;
    const xs = points.map((p) => p.x);
    const ys = points.map((p) => p.y);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    // One scale for both axes: distances on the map mean the same in every direction.
    const scale = Math.min((W - 2 * PAD) / (x1 - x0 || 1), (H - 2 * PAD) / (y1 - y0 || 1));
    const ox = (W - (x1 - x0) * scale) / 2;
    const oy = (H - (y1 - y0) * scale) / 2;
    const { classOf, legend } = colourClasses(points);
    const circles = points.map((p, i) => {
      p.cx = ox + (p.x - x0) * scale;
      p.cy = H - (oy + (p.y - y0) * scale); // up is up
      p.cls = classOf(p.label);
      return C.svg("circle", { cx: p.cx.toFixed(1), cy: p.cy.toFixed(1), r: 4, class: `pt ${p.cls}`, "data-i": i });
    });
    ring = C.svg("circle", { r: 9, class: "focus-ring", visibility: "hidden" });
    const title = C.svg("title");
    const method = data.method.toUpperCase();
    title.textContent = `Scatter plot of ${C.count(points.length)} of ${C.count(data.total)} images of ${data.collection} (${method}), coloured by label.`;
    plot = C.svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "map-svg", role: "img", "aria-label": title.textContent }, [
      title,
      C.svg("g", { class: "points" }, circles),
      ring,
    ]);
    ui.chart.replaceChildren(plot);
    ui.chart.setAttribute("aria-busy", "false");

    ui.legend.replaceChildren(
      ...legend.map((item) =>
        el("li", {}, [
          el(
            "button",
            {
              className: "legend-item",
              attrs: { type: "button", "aria-pressed": "false", "data-cls": item.cls },
            },
            [
              el("span", { className: `swatch ${item.cls}`, attrs: { "aria-hidden": "true" } }),
              el("span", { className: "legend-label", text: item.label !== null ? item.label : item.text }),
              el("span", { className: "legend-count", text: C.count(item.count) }),
            ],
          ),
        ]),
      ),
    );
    const share = data.explained_variance
      ? ` The two axes hold ${Math.round((data.explained_variance[0] + data.explained_variance[1]) * 100)}% of the codes' variance.`
      : "";
    ui.status.textContent = `${C.count(points.length)} of ${C.count(data.total)} images (spread evenly over the collection), ${method} of the ${data.embedder_version} codes.${share}`;
  }

  // ---- hover, focus, click -------------------------------------------------------------------

  function showTip(i, anchor) {
    const p = points[i];
    if (!p) return;
    const label = p.label !== null ? `label ${p.label}` : "no label";
    ui.tip.replaceChildren(
      C.thumbnail(`${C.API}/images/${p.id}/thumbnail`, `Image #${p.id}, ${label}`, 128),
      el("span", { className: "tip-line" }, [el("strong", { text: p.label !== null ? p.label : "–" }), ` #${p.id}`]),
    );
    ui.tip.hidden = false;
    const area = ui.chart.getBoundingClientRect();
    const box = ui.tip.getBoundingClientRect();
    let left = anchor.x - area.left + 14;
    let top = anchor.y - area.top + 14;
    if (left + box.width > area.width) left = anchor.x - area.left - box.width - 14;
    if (top + box.height > area.height) top = anchor.y - area.top - box.height - 14;
    ui.tip.style.left = `${Math.max(0, left)}px`;
    ui.tip.style.top = `${Math.max(0, top)}px`;
  }

  function hideTip() {
    ui.tip.hidden = true;
  }

  function pointAt(target) {
    const circle = target && target.closest && target.closest("circle.pt");
    return circle ? Number(circle.getAttribute("data-i")) : -1;
  }

  function search(i) {
    const p = points[i];
    if (p) window.location.assign(`/?collection=${encodeURIComponent(picker.name())}&image=${p.id}`);
  }

  function focusPoint(i) {
    focused = i;
    const p = points[i];
    if (!p || !ring) return;
    ring.setAttribute("cx", p.cx.toFixed(1));
    ring.setAttribute("cy", p.cy.toFixed(1));
    ring.setAttribute("visibility", "visible");
    const r = plot.getBoundingClientRect();
    showTip(i, { x: r.left + (p.cx / W) * r.width, y: r.top + (p.cy / H) * r.height });
    ui.focus.textContent = `Image #${p.id}, ${p.label !== null ? `label ${p.label}` : "no label"}. Enter searches with it.`;
  }

  /** The nearest point in an arrow key's direction (within a 45° cone either side). */
  function step(dx, dy) {
    if (points.length === 0) return -1;
    if (focused < 0) {
      // Start at the point nearest the centre.
      let best = 0;
      let bestD = Infinity;
      points.forEach((p, i) => {
        const d = (p.cx - W / 2) ** 2 + (p.cy - H / 2) ** 2;
        if (d < bestD) [best, bestD] = [i, d];
      });
      return best;
    }
    const from = points[focused];
    let best = focused;
    let bestD = Infinity;
    points.forEach((p, i) => {
      if (i === focused) return;
      const vx = p.cx - from.cx;
      const vy = p.cy - from.cy;
      const along = vx * dx + vy * dy;
      const across = Math.abs(vx * dy - vy * dx);
      if (along <= 0 || across > along) return;
      const d = along + 2 * across;
      if (d < bestD) [best, bestD] = [i, d];
    });
    return best;
  }

  ui.chart.addEventListener("pointermove", (event) => {
    const i = pointAt(event.target);
    if (i >= 0) showTip(i, { x: event.clientX, y: event.clientY });
    else if (focused < 0) hideTip();
  });
  ui.chart.addEventListener("pointerleave", () => {
    if (focused < 0) hideTip();
  });
  ui.chart.addEventListener("click", (event) => {
    const i = pointAt(event.target);
    if (i >= 0) search(i);
  });
  ui.chart.addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (moves[event.key]) {
      event.preventDefault();
      focusPoint(step(...moves[event.key]));
    } else if (event.key === "Enter" && focused >= 0) {
      event.preventDefault();
      search(focused);
    } else if (event.key === "Escape") {
      focused = -1;
      if (ring) ring.setAttribute("visibility", "hidden");
      hideTip();
      ui.focus.textContent = "";
    }
  });
  ui.chart.addEventListener("blur", () => {
    hideTip();
    if (ring) ring.setAttribute("visibility", "hidden");
    focused = -1;
  });

  ui.legend.addEventListener("click", (event) => {
    const button = event.target.closest("button.legend-item");
    if (!button || !plot) return;
    const on = button.getAttribute("aria-pressed") !== "true";
    for (const other of ui.legend.querySelectorAll("button.legend-item")) other.setAttribute("aria-pressed", "false");
    button.setAttribute("aria-pressed", String(on));
    plot.classList.toggle("dim", on);
    plot.setAttribute("data-show", on ? button.dataset.cls : "");
    for (const circle of plot.querySelectorAll("circle.pt")) {
      circle.classList.toggle("on", on && circle.classList.contains(button.dataset.cls));
    }
  });

  // ---- loading -------------------------------------------------------------------------------

  async function load() {
    const mine = ++request;
    hideTip();
    if (!picker.ready()) {
      ui.chart.replaceChildren();
      ui.legend.replaceChildren();
      ui.status.textContent = "";
      return;
    }
    ui.chart.setAttribute("aria-busy", "true");
    ui.status.textContent = "Projecting the codes…";
    try {
      const data = await C.api(
        `/collections/${encodeURIComponent(picker.name())}/map?sample=${Number(ui.sample.value) || 5000}&method=${encodeURIComponent(ui.method.value)}`,
      );
      if (mine !== request) return;
      C.clearError();
      lastData = data;
      draw(data);
    } catch (error) {
      if (mine !== request) return;
      C.showError(error);
      ui.status.textContent = "";
    }
  }

  function writeUrl() {
    const params = new URLSearchParams({ collection: picker.name() });
    if (ui.method.value !== "pca") params.set("method", ui.method.value);
    if (ui.sample.value !== "5000") params.set("sample", ui.sample.value);
    window.history.replaceState(null, "", `${window.location.pathname}?${params}`);
  }

  let lastData = null;
  PHONE.addEventListener("change", () => {
    if (lastData) draw(lastData);
  });
  // A tooltip placed for the old layout would hang outside the new one.
  window.addEventListener("resize", () => {
    if (focused >= 0) focusPoint(focused);
    else hideTip();
  });

  for (const control of [picker.element, ui.method, ui.sample]) {
    control.addEventListener("change", () => {
      C.describeReadiness(picker);
      writeUrl();
      load();
    });
  }
  byId("controls").addEventListener("submit", (event) => event.preventDefault());

  const params = new URLSearchParams(window.location.search);
  for (const [key, control] of [["method", ui.method], ["sample", ui.sample]]) {
    const value = params.get(key);
    if (value && [...control.options].some((o) => o.value === value)) control.value = value;
  }
  C.describeReadiness(picker);
  load();
})();
