// The duplicates page: start a near-duplicate run (a job, polled), then page through its groups,
// largest first, each a row of thumbnails with the pair scores and the buttons that resolve it
// (keep one, "not duplicates") or reopen it. Data reaches the DOM only as text and attributes.
(function () {
  "use strict";

  const C = window.cbir;
  const picker = C && C.collectionPicker();
  if (!picker) return;

  const el = C.el;
  const byId = C.byId;
  const PER_PAGE = 10;
  const POLL_MS = 500;
  const STATUSES = ["open", "resolved", "all"];
  const TITLE_PAIRS = 8; // pairs named in a member's tooltip; the group's pair list has them all
  const ui = {
    runWhen: byId("run-when"),
    runForm: byId("run-form"),
    threshold: byId("threshold"),
    runStart: byId("run-start"),
    runStatus: byId("run-status"),
    filter: byId("status-filter"),
    counts: { open: byId("count-open"), resolved: byId("count-resolved"), all: byId("count-all") },
    status: byId("status"),
    groups: byId("groups"),
    first: byId("first-page"),
    prev: byId("prev-page"),
    next: byId("next-page"),
    last: byId("last-page"),
    pageInfo: byId("page-info"),
  };
  const defaultThreshold = Number(byId("app").dataset.defaultThreshold);
  const state = { status: "open", page: 1, total: 0, run: null, job: null };
  let request = 0;
  let pollTimer = null;

  function name() {
    return encodeURIComponent(picker.name());
  }

  function pages() {
    return Math.max(1, Math.ceil(state.total / PER_PAGE));
  }

  /** Four decimals, cut (not rounded): a near copy at 0.99996 is not shown as a perfect 1. */
  function score(value) {
    return (Math.floor(Number(value) * 10000) / 10000).toFixed(4);
  }

  /** A bar from the run's threshold (empty) to 1 (full): every pair of a group is above the
   *  threshold, so a bar from 0 would be full for all of them. */
  function thresholdBar(value) {
    const threshold = state.run ? Number(state.run.threshold) : 0;
    const share = threshold < 1 ? (Number(value) - threshold) / (1 - threshold) : 1;
    const fill = el("span", { className: "bar-fill" });
    fill.style.width = `${Math.min(1, Math.max(0.02, share)) * 100}%`;
    return el("span", { className: "bar", attrs: { "aria-hidden": "true" } }, [fill]);
  }

  // ---- the run: its facts, starting one, polling its job --------------------------------------

  function describeRun(run) {
    if (!run) {
      ui.runWhen.textContent = "";
      return;
    }
    const threshold = run.threshold === defaultThreshold ? `${run.threshold} (the default)` : String(run.threshold);
    const parts = [
      `Last run ${C.ago(run.created_at)} (${C.localTime(run.created_at)})`,
      `threshold ${threshold}`,
      C.plural(run.images, "image"),
      C.plural(run.pairs, "pair"),
      C.plural(run.groups, "group"),
      `${run.method}, ${Number(run.seconds).toFixed(1)} s`,
    ];
    let text = parts.join(" · ");
    if (run.truncated_rows) {
      text += `. ${C.plural(run.truncated_rows, "image")} had more near neighbours than a run keeps (their best were kept).`;
    }
    ui.runWhen.textContent = text;
  }

  function running(job) {
    return Boolean(job) && (job.state === "queued" || job.state === "running");
  }

  function showJob(job) {
    state.job = job;
    const busy = running(job);
    ui.runStart.disabled = busy || !picker.ready();
    ui.runStart.textContent = busy ? "Finding…" : "Find duplicates";
    ui.runStatus.classList.remove("failed");
    if (!job) return;
    const threshold = job.params && job.params.threshold !== undefined ? ` at threshold ${job.params.threshold}` : "";
    if (busy) {
      const since = job.started_at ? `, started ${C.ago(job.started_at)}` : "";
      ui.runStatus.textContent = `Finding duplicates${threshold}: ${job.state}${since}…`;
    } else if (job.state === "succeeded") {
      ui.runStatus.textContent = "";
    } else {
      ui.runStatus.textContent = `The last run${threshold} ${job.state === "failed" ? "failed" : `ended ${job.state}`}${job.error ? `: ${job.error}` : "."}`;
      ui.runStatus.classList.add("failed");
    }
  }

  async function poll(jobId) {
    clearTimeout(pollTimer);
    let job;
    try {
      job = await C.api(`/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      ui.runStatus.textContent = `The run could not be followed: ${error.detail || error}`;
      ui.runStart.disabled = !picker.ready();
      return;
    }
    showJob(job);
    if (running(job)) {
      pollTimer = setTimeout(() => poll(jobId), POLL_MS);
      return;
    }
    if (job.state === "succeeded") {
      state.page = 1;
      writeUrl(false);
      await load();
      ui.runStatus.textContent = state.run
        ? `Done: ${C.plural(state.run.groups, "group")} of near duplicates at threshold ${state.run.threshold}.`
        : "Done.";
    }
  }

  /** A threshold typed in the field: null for empty (the default), else a number in (0, 1]. */
  function readThreshold() {
    const raw = ui.threshold.value.trim();
    if (!raw) return null;
    const value = Number(raw);
    if (!Number.isFinite(value) || value <= 0 || value > 1) {
      throw new C.ApiError("Threshold", `A threshold is a cosine similarity above 0 and at most 1 (got “${raw}”); leave it empty for the default, ${defaultThreshold}.`, 0);
    }
    return value;
  }

  async function startRun(event) {
    event.preventDefault();
    C.clearError();
    let threshold;
    try {
      threshold = readThreshold();
    } catch (error) {
      C.showError(error);
      ui.threshold.focus();
      return;
    }
    ui.runStart.disabled = true;
    try {
      const accepted = await C.api(`/collections/${name()}/duplicates`, {
        method: "POST",
        json: threshold === null ? {} : { threshold },
      });
      showJob({ id: accepted.job_id, state: accepted.state, params: { threshold: threshold === null ? defaultThreshold : threshold } });
      pollTimer = setTimeout(() => poll(accepted.job_id), POLL_MS / 2);
    } catch (error) {
      C.showError(error);
      ui.runStart.disabled = !picker.ready();
    }
  }

  /** A run started elsewhere (the CLI, another tab) is followed; a failed latest run is told. */
  async function latestJob() {
    let data;
    try {
      data = await C.api(`/jobs?collection=${name()}&kind=duplicates&limit=1&errors=0`);
    } catch {
      return; // the groups still show
    }
    const job = data && data.jobs && data.jobs[0];
    if (!job) return;
    if (running(job)) {
      showJob(job);
      poll(job.id);
    } else if (job.state !== "succeeded" && !(state.run && state.run.job_id === job.id)) {
      showJob(job);
    }
  }

  // ---- the groups ----------------------------------------------------------------------------

  async function load({ focus = false } = {}) {
    const mine = ++request;
    ui.groups.setAttribute("aria-busy", "true");
    document.body.classList.add("busy");
    let data;
    try {
      data = await C.api(`/collections/${name()}/duplicates?status=${state.status}&page=${state.page}&per_page=${PER_PAGE}`);
    } catch (error) {
      if (mine !== request) return;
      C.showError(error);
      ui.groups.replaceChildren();
      ui.status.textContent = "The groups could not be loaded; see the message above.";
      return;
    } finally {
      if (mine === request) {
        ui.groups.setAttribute("aria-busy", "false");
        document.body.classList.remove("busy");
      }
    }
    if (mine !== request) return;
    state.run = data.run;
    state.total = data.total;
    describeRun(data.run);
    showCounts(data);
    if (state.page > pages() && state.total > 0) {
      state.page = pages();
      writeUrl(false);
      load({ focus });
      return;
    }
    ui.groups.replaceChildren(...data.groups.map(groupItem));
    describe(data);
    if (focus) {
      const first = ui.groups.querySelector("button");
      if (first) first.focus();
    }
  }

  function showCounts(data) {
    ui.counts.open.textContent = C.count(data.open);
    ui.counts.resolved.textContent = C.count(data.resolved);
    ui.counts.all.textContent = C.count(data.open + data.resolved);
  }

  function describe(data) {
    const collection = picker.name();
    if (!data.run) {
      ui.status.textContent = `No duplicate run for ${collection} yet: press Find duplicates.`;
    } else if (state.total === 0) {
      const none = {
        open: data.resolved ? "No open groups: every group is resolved." : `No near duplicates in ${collection} at threshold ${data.run.threshold}.`,
        resolved: "No resolved groups yet.",
        all: `No near duplicates in ${collection} at threshold ${data.run.threshold}.`,
      };
      ui.status.textContent = none[state.status];
    } else {
      const what = state.status === "all" ? "group" : `${state.status} group`;
      const first = (state.page - 1) * PER_PAGE + 1;
      ui.status.textContent = `${C.plural(state.total, what)}, largest first · showing ${C.count(first)}–${C.count(first + data.groups.length - 1)}`;
    }
    ui.pageInfo.textContent = `Page ${C.count(state.page)} of ${C.count(pages())}`;
    ui.first.disabled = ui.prev.disabled = state.page <= 1;
    ui.next.disabled = ui.last.disabled = state.page >= pages();
  }

  function memberName(member) {
    return [member.label ? `label ${member.label}` : null, `image #${member.id}`, member.original_name || null].filter(Boolean).join(", ");
  }

  function groupState(group) {
    if (group.status === "resolved") return "resolved";
    return group.reopened ? "reopened" : "open";
  }

  function summary(group) {
    const resolution = group.resolution;
    const others = group.size - 1;
    if (group.status === "resolved" && resolution) {
      return resolution.action === "keep"
        ? `Kept #${resolution.keep}; the other ${C.plural(others, "image is", "images are")} its duplicates.`
        : "Not duplicates: these images only look alike.";
    }
    const best = group.pairs.length ? ` Best pair ${score(group.pairs[0].score)}.` : "";
    if (group.reopened) {
      const before = resolution ? (resolution.action === "keep" ? ` (kept #${resolution.keep})` : " (not duplicates)") : "";
      const joined = group.new_members.length
        ? `${C.plural(group.new_members.length, "new image")} (marked new) joined it since it was resolved${before}.`
        : `It changed since it was resolved${before}.`;
      return `Reopened: ${joined}${best}`;
    }
    return `Open: choose the image to keep, or mark them not duplicates.${best}`;
  }

  /** Each member's pairs, best first: id -> [[other id, score], ...]. */
  function pairsByMember(group) {
    const by = new Map(group.members.map((m) => [m.id, []]));
    for (const pair of group.pairs) {
      if (by.has(pair.left)) by.get(pair.left).push([pair.right, pair.score]);
      if (by.has(pair.right)) by.get(pair.right).push([pair.left, pair.score]);
    }
    for (const list of by.values()) list.sort((a, b) => b[1] - a[1]);
    return by;
  }

  function memberItem(group, member, pairs) {
    const open = group.status === "open";
    const isNew = group.new_members.includes(member.id);
    const described = memberName(member);
    const best = pairs.length ? pairs[0][1] : null;
    const listed = pairs.slice(0, TITLE_PAIRS).map(([other, s]) => `#${other}: ${score(s)}`);
    if (pairs.length > TITLE_PAIRS) listed.push(`${C.count(pairs.length - TITLE_PAIRS)} more`);
    const pairText = listed.join(", ");
    const classes = ["dup-member"];
    if (isNew) classes.push("new");
    if (member.role) classes.push(`role-${member.role}`);

    const view = el(
      "button",
      {
        className: "dup-thumb",
        attrs: { type: "button", "data-id": member.id, "aria-label": `${described}. Open it with its neighbours.`, title: member.original_name || null },
      },
      [el("span", { className: "thumb-box" }, [C.thumbnail(member.thumbnail_url, described)])],
    );
    const tags = [];
    if (isNew) tags.push(el("span", { className: "tag tag-new", text: "new" }));
    if (member.role === "keep") tags.push(el("span", { className: "tag tag-keep", text: "kept" }));
    if (member.role === "duplicate") tags.push(el("span", { className: "tag tag-duplicate", text: "duplicate" }));
    const children = [
      view,
      el("span", { className: "tile-line" }, [
        el("span", { className: "label", text: member.label || member.original_name || "no label" }),
        el("span", { className: "rank", text: `#${member.id}` }),
      ]),
      el("span", { className: "dup-score", attrs: { title: pairText ? `Its pairs in the group (the bar runs from the threshold to 1): ${pairText}` : null } }, [
        el("span", { className: "dup-score-line" }, [
          el("span", { className: "visually-hidden", text: "best pair score " }),
          el("span", { className: "score", text: best === null ? "–" : score(best) }),
          ...tags,
        ]),
        thresholdBar(best === null ? 0 : best),
      ]),
    ];
    if (open) {
      children.push(
        el("button", {
          className: "button keep",
          text: "Keep this",
          attrs: {
            type: "button",
            "data-action": "keep",
            "data-keep": member.id,
            "aria-label": `Keep this: ${described}; the other ${C.plural(group.size - 1, "image")} of group ${group.id} become its duplicates`,
          },
        }),
      );
    }
    return el("li", { className: classes.join(" "), attrs: { "data-id": member.id } }, children);
  }

  /** The group's pairs, folded; the table is built when first unfolded (a large group has
   *  thousands of pairs). */
  function pairList(group) {
    const details = el("details", { className: "dup-pairs" }, [
      el("summary", { text: `${C.plural(group.pairs.length, "pair")} with their scores` }),
    ]);
    details.addEventListener("toggle", () => {
      if (details.open && details.children.length === 1) details.append(pairTable(group));
    });
    return details;
  }

  function pairTable(group) {
    const rows = group.pairs.map((pair) =>
      el("tr", {}, [
        el("td", { text: `#${pair.left}` }),
        el("td", { text: `#${pair.right}` }),
        el("td", { className: "num", text: score(pair.score) }),
      ]),
    );
    return el("div", { className: "table-wrap" }, [
      el("table", { className: "data-table" }, [
        el("caption", { className: "visually-hidden", text: `Pairs of group ${group.id}, best first` }),
        el("thead", {}, [
          el("tr", {}, [
            el("th", { text: "Image", attrs: { scope: "col" } }),
            el("th", { text: "Image", attrs: { scope: "col" } }),
            el("th", { text: "Cosine", attrs: { scope: "col" } }),
          ]),
        ]),
        el("tbody", {}, rows),
      ]),
    ]);
  }

  function groupItem(group) {
    const shown = groupState(group);
    const titleId = `group-${group.id}-title`;
    const by = pairsByMember(group);
    const actions = el("div", { className: "button-row" });
    if (group.status === "open") {
      actions.append(
        el("button", {
          className: "button",
          text: "Not duplicates",
          attrs: { type: "button", "data-action": "not_duplicates", "aria-label": `Not duplicates: the images of group ${group.id} only look alike` },
        }),
      );
    } else {
      actions.append(
        el("button", {
          className: "button",
          text: "Reopen",
          attrs: { type: "button", "data-action": "reopen", "aria-label": `Reopen group ${group.id}` },
        }),
      );
    }
    return el("li", { className: `dup-group state-${shown}`, attrs: { "data-group": group.id, "aria-labelledby": titleId } }, [
      el("header", { className: "dup-head" }, [
        el("h3", { className: "dup-title", attrs: { id: titleId }, text: `Group ${group.id} · ${C.plural(group.size, "image")}` }),
        el("span", { className: `badge dup-state state-${shown}`, text: shown }),
      ]),
      el("p", { className: "dup-summary", text: summary(group) }),
      el("ol", { className: "dup-members" }, group.members.map((m) => memberItem(group, m, by.get(m.id) || []))),
      pairList(group),
      actions,
    ]);
  }

  const STALE = "A newer run has replaced the groups shown: reload the page to see its groups.";

  /** The group as the server has it now, if it still has the members shown; else null. A newer
   *  run gives its groups new ids, so a stale id answers 404 (caught by the caller). */
  async function stillShown(item, path) {
    const group = await C.api(path);
    const shown = [...item.querySelectorAll("li.dup-member")].map((m) => Number(m.dataset.id)).sort((a, b) => a - b);
    const now = group.members.map((m) => m.id).sort((a, b) => a - b);
    return shown.length === now.length && shown.every((id, i) => id === now[i]) ? group : null;
  }

  async function act(item, action, keep) {
    const groupId = Number(item.dataset.group);
    const path = `/collections/${name()}/duplicates/${groupId}`;
    const init = action === "reopen" ? { method: "DELETE" } : { method: "POST", json: action === "keep" ? { action, keep } : { action } };
    C.clearError();
    item.setAttribute("aria-busy", "true");
    const buttons = [...item.querySelectorAll("button[data-action]")];
    for (const button of buttons) button.disabled = true;
    let group = null;
    try {
      if (await stillShown(item, path)) group = await C.api(`${path}/resolution`, init);
      else C.showError({ title: "Groups changed", detail: STALE });
    } catch (error) {
      C.showError(error);
      if (error.code === "duplicate_group_not_found") ui.status.textContent = STALE;
    }
    if (!group) {
      item.setAttribute("aria-busy", "false");
      for (const button of buttons) button.disabled = false;
      return;
    }
    // The group stays in place (also under the filter it left) until the next load.
    const fresh = groupItem(group);
    item.replaceWith(fresh);
    const said = {
      keep: `Group ${groupId} resolved: #${keep} kept, the others are its duplicates.`,
      not_duplicates: `Group ${groupId} resolved: not duplicates.`,
      reopen: `Group ${groupId} reopened.`,
    };
    ui.status.textContent = said[action];
    const next = fresh.querySelector("button[data-action]");
    if (next) next.focus();
    refreshCounts();
  }

  async function refreshCounts() {
    try {
      showCounts(await C.api(`/collections/${name()}/duplicates?status=open&per_page=1`));
    } catch {
      // the old counts stay until the next load
    }
  }

  // ---- the address bar: ?collection=…&status=…&page=… -------------------------------------------

  function writeUrl(push) {
    const params = new URLSearchParams();
    params.set("collection", picker.name());
    if (state.status !== "open") params.set("status", state.status);
    if (state.page > 1) params.set("page", String(state.page));
    C.writeUrl(params, push);
  }

  function markFilter() {
    for (const button of ui.filter.querySelectorAll("button.chip")) {
      button.setAttribute("aria-pressed", String(button.dataset.status === state.status));
    }
  }

  function applyUrl() {
    const params = new URLSearchParams(window.location.search);
    const status = params.get("status");
    state.status = STATUSES.includes(status) ? status : "open";
    const page = Number(params.get("page"));
    state.page = Number.isInteger(page) && page >= 1 ? page : 1;
    markFilter();
    return load();
  }

  function go(page) {
    state.page = Math.min(Math.max(1, page), pages());
    writeUrl(true);
    load({ focus: true });
  }

  // ---- wiring --------------------------------------------------------------------------------

  ui.runForm.addEventListener("submit", startRun);
  ui.first.addEventListener("click", () => go(1));
  ui.prev.addEventListener("click", () => go(state.page - 1));
  ui.next.addEventListener("click", () => go(state.page + 1));
  ui.last.addEventListener("click", () => go(pages()));

  ui.filter.addEventListener("click", (event) => {
    const button = event.target.closest("button.chip");
    if (!button || button.dataset.status === state.status) return;
    state.status = button.dataset.status;
    state.page = 1;
    markFilter();
    writeUrl(true);
    load();
  });

  ui.groups.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const item = button.closest("li.dup-group");
    if (button.classList.contains("dup-thumb")) {
      C.openImage(Number(button.dataset.id), { neighbours: true });
    } else if (button.dataset.action && item) {
      act(item, button.dataset.action, Number(button.dataset.keep) || null);
    }
  });

  byId("controls").addEventListener("submit", (event) => event.preventDefault());
  picker.element.addEventListener("change", () => {
    const url = new URL(window.location.href);
    url.search = `?collection=${encodeURIComponent(picker.name())}`;
    window.location.assign(url); // a fresh page: the default threshold is the embedder's
  });
  window.addEventListener("popstate", applyUrl);

  C.describeReadiness(picker);
  if (!picker.ready()) {
    ui.status.textContent = "";
    ui.groups.setAttribute("aria-busy", "false");
    return;
  }
  ui.runStart.disabled = false;
  applyUrl().then(latestJob); // after the run is known: a failure older than it is not news
})();
