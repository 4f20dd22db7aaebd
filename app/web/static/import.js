// The import page: start an import (archive upload or built-in dataset, into an existing or a
// new collection) and watch the jobs: progress, images per second, ETA, failures with reasons.
// Data (file names, member names, error details) reaches the DOM only as text.
(function () {
  "use strict";

  const C = window.cbir;
  if (!C) return;
  const el = C.el;
  const byId = C.byId;
  const ui = {
    form: byId("import-form"),
    collection: byId("collection"),
    newFields: byId("new-collection"),
    newName: byId("new-name"),
    newEmbedder: byId("new-embedder"),
    archiveFields: byId("archive-fields"),
    archive: byId("archive"),
    datasetFields: byId("dataset-fields"),
    folderFields: byId("folder-fields"),
    folder: byId("folder"),
    dataset: byId("dataset"),
    start: byId("start"),
    all: byId("all-collections"),
    status: byId("jobs-status"),
    jobs: byId("jobs"),
  };
  if (!ui.form) return;

  const FAST = 500; // ms between polls while a job runs
  const SLOW = 5000; // otherwise: notices jobs started elsewhere (the CLI, another tab)
  let timer = null;
  let polling = 0;
  let wasRunning = false;
  const openErrors = new Set(); // job ids whose error list is open: kept open across refreshes

  function source() {
    const checked = ui.form.querySelector("input[name=source]:checked");
    return checked ? checked.value : "archive";
  }

  function showFields() {
    ui.newFields.hidden = ui.collection.value !== "";
    ui.archiveFields.hidden = source() !== "archive";
    ui.datasetFields.hidden = source() !== "dataset";
    if (ui.folderFields) ui.folderFields.hidden = source() !== "folder";
  }

  async function ensureCollection() {
    if (ui.collection.value) return ui.collection.value;
    const name = ui.newName.value.trim();
    if (!/^[a-z0-9][a-z0-9_-]{0,63}$/.test(name)) {
      ui.newName.focus();
      throw new C.ApiError("Collection name", "Use 1 to 64 lowercase letters, digits, “-” or “_”, starting with a letter or digit.", 0);
    }
    const created = await C.api("/collections", { method: "POST", json: { name, embedder: ui.newEmbedder.value } });
    // Keep the new collection in the picker, selected.
    const unready = created.ready ? "" : " — no trained checkpoint yet";
    const option = el("option", {
      text: `${created.name} — 0 images · ${created.embedder}${unready}`,
      attrs: { value: created.name, "data-ready": String(created.ready), "data-embedder": created.embedder },
    });
    ui.collection.insertBefore(option, ui.collection.lastElementChild);
    ui.collection.value = created.name;
    ui.newName.value = "";
    showFields();
    return created.name;
  }

  async function start(event) {
    event.preventDefault();
    C.clearError();
    let request;
    if (source() === "archive") {
      const file = ui.archive.files && ui.archive.files[0];
      if (!file) {
        C.showError({ title: "No archive", detail: "Choose a zip or tar file of images first." });
        ui.archive.focus();
        return;
      }
      const form = new FormData();
      form.append("file", file, file.name);
      request = { method: "POST", body: form };
    } else if (source() === "folder") {
      request = { method: "POST", json: { folder: ui.folder.value.trim() } };
    } else {
      const [dataset, split] = ui.dataset.value.split(":");
      request = { method: "POST", json: { dataset, split } };
    }
    ui.start.disabled = true;
    ui.start.textContent = source() === "archive" ? "Uploading…" : "Starting…";
    try {
      const name = await ensureCollection();
      await C.api(`/collections/${encodeURIComponent(name)}/imports`, request);
      wasRunning = true; // a small import may be over before the next poll
      ui.archive.value = "";
      const url = new URL(window.location.href);
      url.searchParams.set("collection", name);
      window.history.replaceState(null, "", url);
      refresh();
    } catch (error) {
      C.showError(error);
    } finally {
      ui.start.disabled = false;
      ui.start.textContent = "Start the import";
    }
  }

  // ---- the jobs ------------------------------------------------------------------------------

  function describeSource(params, kind) {
    if (kind === "reembed") return `switch to ${(params && params.embedder) || "another embedder"}`;
    if (!params) return "import";
    if (params.source === "dataset") return `${params.dataset} ${params.split}`;
    if (params.source === "archive") return params.filename || "archive";
    if (params.source === "folder") return params.path || (params.root ? `folder in ${params.root}` : "folder");
    return params.source || "import";
  }

  function jobCard(job) {
    const total = Number(job.total) || 0;
    const done = Number(job.done) || 0;
    const percent = total ? Math.min(100, Math.floor((done / total) * 100)) : job.state === "succeeded" ? 100 : 0;
    const running = job.state === "running" || job.state === "queued";

    const progress = el("progress", {
      className: `progress state-${job.state}`,
      attrs: { max: 100, value: percent, "aria-label": `${describeSource(job.params, job.kind)}: ${percent}%` },
    });
    const numbers = [];
    numbers.push(total ? `${C.count(done)} of ${C.count(total)}` : `${C.count(done)} done`);
    if (job.images_per_second) numbers.push(`${C.count(Math.round(job.images_per_second))} images/s`);
    if (running && job.eta_seconds != null) numbers.push(`about ${C.duration(job.eta_seconds)} left`);
    if (!running && job.started_at && job.finished_at) {
      numbers.push(`took ${C.duration((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000)}`);
    }
    const counts = el("p", { className: "job-counts" }, [
      el("span", { text: `${C.count(job.added)} added` }),
      el("span", { text: `${C.count(job.duplicates)} already there` }),
      el("span", { className: job.failed ? "failed" : "", text: `${C.count(job.failed)} failed` }),
    ]);

    const children = [
      el("div", { className: "job-head" }, [
        el("span", { className: "job-title", text: describeSource(job.params, job.kind) }),
        el("span", { className: "job-collection", text: job.collection ? `→ ${job.collection}` : "" }),
        el("span", { className: `badge state-${job.state}`, text: job.state }),
      ]),
      el("div", { className: "job-progress" }, [progress, el("span", { className: "percent", text: `${percent}%` })]),
      el("p", { className: "job-numbers", text: numbers.join(" · ") }),
      counts,
    ];
    if (job.error) children.push(el("p", { className: "job-error", text: job.error }));
    const option = [...ui.collection.options].find((o) => o.value === job.collection);
    if (job.state === "succeeded" && option && option.dataset.ready === "false") {
      const embedder = option.dataset.embedder || "cdae";
      children.push(
        el("p", { className: "hint" }, [
          "Next, train its embedder so it can be searched: ",
          el("code", { text: `cbir train ${embedder} --collection ${job.collection}` }),
        ]),
      );
    }
    if (job.failed && (job.errors || []).length) {
      const list = el("ul", { className: "error-list" });
      for (const error of job.errors) {
        list.append(
          el("li", {}, [
            el("span", { className: "error-item", text: error.item || "(unnamed)" }),
            el("span", { className: "error-code", text: error.code || "error" }),
            el("span", { className: "error-detail", text: error.detail || "" }),
          ]),
        );
      }
      const more = job.failed > job.errors.length ? ` (first ${C.count(job.errors.length)})` : "";
      const details = el("details", { className: "job-errors", attrs: { "data-job": job.id } }, [
        el("summary", { text: `Why ${C.plural(job.failed, "file")} failed${more}` }),
        list,
      ]);
      if (openErrors.has(job.id)) details.open = true;
      details.addEventListener("toggle", () => {
        if (details.open) openErrors.add(job.id);
        else openErrors.delete(job.id);
      });
      children.push(details);
    }
    return el("li", { className: `job state-${job.state}`, attrs: { "data-job": job.id } }, children);
  }

  /** After imports end, the picker's "N images" of their collections is out of date: refresh it. */
  async function updateCounts(jobs) {
    for (const name of new Set(jobs.map((j) => j.collection).filter(Boolean))) {
      const option = [...ui.collection.options].find((o) => o.value === name);
      if (!option) continue;
      try {
        const info = await C.api(`/collections/${encodeURIComponent(name)}`);
        const unready = info.ready ? "" : " — no trained checkpoint yet";
        option.textContent = `${info.name} — ${C.plural(info.image_count, "image")} · ${info.embedder}${unready}`;
      } catch {
        // the old text stays
      }
    }
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++polling;
    // Imports, and the embedder switches that re-import a collection; evaluations and whitening
    // are jobs too, listed by GET /api/v1/jobs but not here.
    const params = new URLSearchParams({ limit: "10", errors: "50", kind: "import" });
    params.append("kind", "reembed");
    const name = ui.collection.value;
    if (!ui.all.checked && name) params.set("collection", name);
    let running = false;
    try {
      const data = await C.api(`/jobs?${params}`);
      if (mine !== polling) return;
      const jobs = (data && data.jobs) || [];
      running = jobs.some((j) => j.state === "running" || j.state === "queued");
      ui.jobs.replaceChildren(...jobs.map(jobCard));
      if (wasRunning && !running) updateCounts(jobs);
      wasRunning = running;
      const scope = ui.all.checked || !name ? "" : ` of ${name}`;
      ui.status.textContent = jobs.length
        ? running
          ? `Importing${scope}: the bars update twice a second.`
          : `The latest imports${scope}.`
        : `No imports${scope} yet.`;
    } catch (error) {
      if (mine !== polling) return;
      ui.status.textContent = error.status === 404 ? "Choose a collection to see its jobs." : `Jobs could not be loaded: ${error.detail || error}`;
    }
    if (mine === polling && !document.hidden) timer = setTimeout(refresh, running ? FAST : SLOW);
  }

  ui.form.addEventListener("submit", start);
  ui.form.addEventListener("change", (event) => {
    if (event.target.name === "source" || event.target === ui.collection) showFields();
    if (event.target === ui.collection) {
      if (ui.collection.value) {
        const url = new URL(window.location.href);
        url.searchParams.set("collection", ui.collection.value);
        window.history.replaceState(null, "", url);
      }
      refresh();
    }
  });
  ui.all.addEventListener("change", refresh);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });

  showFields();
  refresh();
})();
