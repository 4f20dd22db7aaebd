// The evaluate page: the collection's retrieval quality (P@10, mAP, a precision-recall curve
// drawn as SVG), computed in the background on request; and one query side by side under two
// embedders. Data reaches the DOM only as text and attributes.
(function () {
  "use strict";

  const C = window.cbir;
  const picker = C && C.collectionPicker();
  if (!picker) return;
  const el = C.el;
  const byId = C.byId;
  const SERIES = 5; // line colours in style.css (.series-0 … .series-4)
  const ui = {
    when: byId("eval-when"),
    table: byId("eval-table"),
    rows: byId("eval-rows"),
    figure: byId("pr-figure"),
    chart: byId("pr-chart"),
    status: byId("eval-status"),
    form: byId("eval-form"),
    queries: byId("queries"),
    limit: byId("limit"),
    evalCompare: byId("eval-compare"),
    evalStart: byId("eval-start"),
    compareForm: byId("compare-form"),
    compareImage: byId("compare-image"),
    against: byId("against"),
    sample: byId("sample"),
    compareStart: byId("compare-start"),
    compareStatus: byId("compare-status"),
    compareQuery: byId("compare-query"),
    sides: byId("compare-sides"),
  };
  let timer = null;
  let polling = 0;
  let choicesFor = null;
  let lastCurves = null; // redrawn when the width changes, so its text stays readable

  function name() {
    return encodeURIComponent(picker.name());
  }

  // ---- quality -------------------------------------------------------------------------------

  function fillChoices(data) {
    if (choicesFor === data.collection) return;
    choicesFor = data.collection;
    const keepQueries = ui.queries.value;
    ui.queries.replaceChildren(...data.query_sets.map((q) => el("option", { text: q, attrs: { value: q } })));
    if (data.query_sets.includes(keepQueries)) ui.queries.value = keepQueries;
    const choices = data.compare_choices || [];
    ui.evalCompare.replaceChildren(
      el("option", { text: "nothing else", attrs: { value: "" } }),
      ...choices.map((c) => el("option", { text: c.spec, attrs: { value: c.spec, title: c.description } })),
    );
    ui.against.replaceChildren(
      ...choices.map((c) => el("option", { text: `${c.spec} — ${c.description}`, attrs: { value: c.spec } })),
    );
    ui.compareStart.disabled = choices.length === 0;
    const wanted = new URLSearchParams(window.location.search).get("against");
    if (wanted && choices.some((c) => c.spec === wanted)) ui.against.value = wanted;
  }

  function describeRun(run) {
    const how = run.limit ? `the first ${C.count(run.limit)} of ${run.queries}` : `all of ${run.queries}`;
    const also = run.compare && run.compare.length ? `, also ${run.compare.join(", ")}` : "";
    return `${how}${also}`;
  }

  function render(data) {
    fillChoices(data);
    const latest = data.latest;
    if (latest) {
      ui.rows.replaceChildren(
        ...latest.results.map((row, i) =>
          el("tr", {}, [
            el("th", { attrs: { scope: "row" } }, [
              el("span", { className: "swatch", attrs: { "data-series": i % SERIES, "aria-hidden": "true" } }),
              row.embedder,
            ]),
            el("td", { text: C.count(row.queries) }),
            el("td", { className: "opt", text: C.count(row.database) }),
            el("td", { className: "num strong", text: row.p_at_10.toFixed(3) }),
            el("td", { className: "num opt", text: row.map_at_10.toFixed(3) }),
            el("td", { className: "num strong", text: row.map_all.toFixed(3) }),
            el("td", { className: "num opt", text: row.seconds.toFixed(1) }),
          ]),
        ),
      );
      ui.table.hidden = false;
      ui.when.textContent = `Computed ${C.ago(latest.computed_at)} (${C.localTime(latest.computed_at)}) with ${describeRun(latest)} as queries.`;
      const curves = latest.results.filter((r) => r.pr_curve);
      ui.figure.hidden = curves.length === 0;
      lastCurves = curves.length ? curves : null;
      if (curves.length) ui.chart.replaceChildren(prChart(curves));
    } else {
      ui.table.hidden = true;
      ui.figure.hidden = true;
      ui.when.textContent = "";
    }
    const running = data.running || [];
    const parts = [];
    if (running.length) parts.push(`Computing with ${running.map(describeRun).join("; ")}, started ${C.ago(running[0].started_at)}…`);
    else if (!latest) parts.push("Not evaluated yet for this embedder: choose the queries below and press Compute.");
    if (data.failure) parts.push(`The last run failed: ${data.failure.error}`);
    ui.status.textContent = parts.join(" ");
    ui.status.classList.toggle("failed", Boolean(data.failure) && !running.length);
    ui.evalStart.disabled = running.length > 0 || !picker.ready();
    ui.evalStart.textContent = running.length ? "Computing…" : latest ? "Compute again" : "Compute";
    return running.length > 0;
  }

  function prChart(rows) {
    // Drawn at about its size on screen, so the text stays readable on a phone.
    const W = Math.round(Math.min(520, Math.max(300, ui.chart.clientWidth || 520)));
    const H = Math.round(W * 0.65);
    const m = { left: 52, right: 16, top: 16, bottom: 46 };
    const x = (r) => m.left + r * (W - m.left - m.right);
    const y = (p) => H - m.bottom - p * (H - m.top - m.bottom);
    const grid = [];
    for (let t = 0; t <= 10; t += 2) {
      const v = t / 10;
      grid.push(C.svg("line", { x1: x(0), x2: x(1), y1: y(v), y2: y(v), class: "grid" }));
      grid.push(C.svg("line", { x1: x(v), x2: x(v), y1: y(0), y2: y(1), class: "grid" }));
      const yl = C.svg("text", { x: m.left - 8, y: y(v) + 4, class: "tick", "text-anchor": "end" });
      yl.textContent = v.toFixed(1);
      const xl = C.svg("text", { x: x(v), y: H - m.bottom + 18, class: "tick", "text-anchor": "middle" });
      xl.textContent = v.toFixed(1);
      grid.push(yl, xl);
    }
    const xTitle = C.svg("text", { x: (x(0) + x(1)) / 2, y: H - 6, class: "axis-title", "text-anchor": "middle" });
    xTitle.textContent = "recall";
    const yTitle = C.svg("text", {
      x: -(y(0) + y(1)) / 2,
      y: 14,
      class: "axis-title",
      "text-anchor": "middle",
      transform: "rotate(-90)",
    });
    yTitle.textContent = "precision";
    const series = rows.map((row, i) => {
      const points = row.pr_curve.recall.map((r, j) => [x(r), y(row.pr_curve.precision[j])]);
      const line = C.svg("polyline", {
        points: points.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "),
        class: `series series-${i % SERIES}`,
      });
      const dots = points.map(([a, b], j) => {
        const dot = C.svg("circle", { cx: a.toFixed(1), cy: b.toFixed(1), r: 3.5, class: `dot series-${i % SERIES}` });
        const tip = C.svg("title");
        tip.textContent = `${row.embedder}: precision ${row.pr_curve.precision[j].toFixed(3)} at recall ${row.pr_curve.recall[j].toFixed(1)}`;
        dot.append(tip);
        return dot;
      });
      return C.svg("g", {}, [line, ...dots]);
    });
    const summary = rows
      .map((r) => `${r.embedder}: precision ${r.pr_curve.precision.map((p) => p.toFixed(2)).join(", ")}`)
      .join("; ");
    const title = C.svg("title");
    title.textContent = `Precision at recall 0, 0.1, … 1. ${summary}`;
    const chart = C.svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "pr-chart" }, [title, ...grid, xTitle, yTitle, ...series]);
    const legend = el(
      "ul",
      { className: "chart-legend" },
      rows.map((row, i) =>
        el("li", {}, [el("span", { className: "swatch", attrs: { "data-series": i % SERIES, "aria-hidden": "true" } }), row.embedder]),
      ),
    );
    return el("div", {}, [chart, legend]);
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++polling;
    let running = false;
    try {
      const data = await C.api(`/collections/${name()}/evaluation`);
      if (mine !== polling) return;
      running = render(data);
    } catch (error) {
      if (mine !== polling) return;
      ui.status.textContent = error.status === 409 ? "This collection cannot be evaluated yet." : `${error.title || "Error"}: ${error.detail || error}`;
    }
    if (running && mine === polling) timer = setTimeout(refresh, 1000);
  }

  async function startEvaluation(event) {
    event.preventDefault();
    C.clearError();
    const body = {
      queries: ui.queries.value,
      limit: ui.limit.value ? Number(ui.limit.value) : null,
      compare: ui.evalCompare.value ? [ui.evalCompare.value] : [],
    };
    ui.evalStart.disabled = true;
    try {
      render(await C.api(`/collections/${name()}/evaluation`, { method: "POST", json: body }));
      timer = setTimeout(refresh, 500);
    } catch (error) {
      C.showError(error);
      ui.evalStart.disabled = false;
    }
  }

  // ---- side by side --------------------------------------------------------------------------

  async function defaultQuery() {
    if (ui.compareImage.value) return;
    try {
      const images = await C.api(`/collections/${name()}/images?limit=1`);
      if (Array.isArray(images) && images.length && !ui.compareImage.value) ui.compareImage.value = String(images[0].id);
    } catch {
      // the field stays empty: the person types an id
    }
  }

  function sideColumn(side, queryLabel, k) {
    const hits = side.hits || [];
    const same = queryLabel ? hits.filter((h) => h.label === queryLabel).length : null;
    const list = el(
      "ol",
      { className: "side-list" },
      hits.map((hit) => {
        const score = Number(hit.score);
        const label = hit.label || `#${hit.id}`;
        const link = el(
          "a",
          {
            className: "side-hit",
            attrs: {
              href: `/?collection=${encodeURIComponent(picker.name())}&image=${hit.id}`,
              "aria-label": `Rank ${hit.rank}: ${hit.label ? `label ${hit.label}` : `image #${hit.id}`}${queryLabel && hit.label === queryLabel ? " (same as the query)" : ""}, similarity ${score.toFixed(3)}. Search with it.`,
            },
          },
          [
            el("span", { className: "rank", text: `#${hit.rank}` }),
            el("span", { className: "thumb-box small" }, [C.thumbnail(hit.thumbnail_url, "", 64)]),
            el("span", {
              className: `label${queryLabel && hit.label === queryLabel ? " match" : ""}`,
              text: label,
              attrs: { title: queryLabel && hit.label === queryLabel ? "same label as the query" : null },
            }),
            el("span", { className: "side-score" }, [el("span", { className: "score", text: score.toFixed(3) }), C.scoreBar(score)]),
          ],
        );
        return el("li", {}, [link]);
      }),
    );
    const head = el("header", { className: "side-head" }, [
      el("h3", { className: "side-title", text: side.embedder }),
      el("p", { className: "meta", text: `${side.source} · ${(side.timings_ms.total || 0).toFixed(0)} ms` }),
      same === null ? null : el("p", { className: "side-score-line", text: `${same} of ${hits.length || k} share the query's label ${queryLabel}` }),
    ]);
    return el("section", { className: "side card-inner" }, [head, list]);
  }

  async function runCompare(event) {
    if (event) event.preventDefault();
    C.clearError();
    const id = ui.compareImage.value.trim();
    if (!/^\d+$/.test(id)) {
      C.showError({ title: "Query", detail: "Give the id of a stored image, for example 1234." });
      ui.compareImage.focus();
      return;
    }
    if (!ui.against.value) return;
    const sample = Number(ui.sample.value) || 2000;
    const against = encodeURIComponent(ui.against.value);
    const compareOn = (size) => C.api(`/collections/${name()}/images/${id}/compare?against=${against}&k=10&sample=${size}`);
    let note = "";
    // A sample over the cost budget (a CNN computes its codes now) is refused with the largest
    // that fits: ask once more with that one, and say so.
    async function compareWithin() {
      try {
        return await compareOn(sample);
      } catch (error) {
        const problem = error && error.code === "over_budget" ? error.problem : null;
        const fits = problem ? Number(problem.fits_sample) || 0 : 0;
        if (!(fits > 0 && fits < sample)) throw error;
        ui.compareStatus.textContent = `${C.count(sample)} images are over the time budget for ${ui.against.value}: searching ${C.count(fits)} twice…`;
        note = `Compared on ${C.count(fits)} images, the most the ${Number(problem.budget_s)} s budget allows.`;
        return compareOn(fits);
      }
    }
    ui.compareStart.disabled = true;
    ui.compareStatus.textContent = `Searching ${C.count(sample)} images twice…`;
    try {
      const [data, image] = await Promise.all([compareWithin(), C.api(`/images/${id}`)]);
      const label = C.labelOf(image.metadata);
      const img = el("img", { className: "compare-query-image", attrs: { alt: `Query: image #${image.id}${label ? `, label ${label}` : ""}`, width: 96, height: 96 } });
      const src = C.sameOrigin(image.image_url);
      if (src) img.src = src;
      C.pixelateWhenUpscaled(img);
      ui.compareQuery.replaceChildren(
        img,
        el("div", {}, [
          el("p", { className: "caption-main", text: label ? `Query: label ${label}` : `Query: image #${image.id}` }),
          el("p", { className: "caption-sub", text: `#${image.id}${image.original_name ? ` · ${image.original_name}` : ""}` }),
          el("p", { className: "caption-sub", text: `Both sides searched the same ${C.count(data.sample)} of ${C.count(data.total)} images (every ${C.count(Math.max(1, Math.round(data.total / data.sample)))}th by id), the query left out.` }),
        ]),
      );
      ui.compareQuery.hidden = false;
      ui.sides.replaceChildren(...data.sides.map((side) => sideColumn(side, label, data.k)));
      ui.compareStatus.textContent = note;
      const url = new URL(window.location.href);
      url.searchParams.set("image", id);
      url.searchParams.set("against", ui.against.value);
      window.history.replaceState(null, "", url);
    } catch (error) {
      ui.compareStatus.textContent = "";
      C.showError(error);
    } finally {
      ui.compareStart.disabled = false;
    }
  }

  // ---- wiring --------------------------------------------------------------------------------

  let drawnWidth = 0;
  window.addEventListener("resize", () => {
    const width = ui.chart.clientWidth;
    if (!lastCurves || Math.abs(width - drawnWidth) < 40) return;
    drawnWidth = width;
    ui.chart.replaceChildren(prChart(lastCurves));
  });

  ui.form.addEventListener("submit", startEvaluation);
  ui.compareForm.addEventListener("submit", runCompare);
  byId("controls").addEventListener("submit", (event) => event.preventDefault());
  picker.element.addEventListener("change", () => {
    const url = new URL(window.location.href);
    url.search = `?collection=${encodeURIComponent(picker.name())}`;
    window.location.assign(url); // a fresh page for a fresh collection: its choices differ
  });

  C.describeReadiness(picker);
  if (!picker.ready()) {
    ui.status.textContent = "";
    ui.evalStart.disabled = true;
    ui.compareStart.disabled = true;
    return;
  }
  const params = new URLSearchParams(window.location.search);
  if (/^\d+$/.test(params.get("image") || "")) ui.compareImage.value = params.get("image");
  const sample = params.get("sample");
  if (sample && [...ui.sample.options].some((o) => o.value === sample)) ui.sample.value = sample;
  refresh();
  defaultQuery();
})();
