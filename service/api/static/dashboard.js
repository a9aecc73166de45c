/* radnode dashboard: fills the server-rendered pages from /api/v1 and polls the live ones.
 *
 * Everything that comes from the API is put into the page as text (textContent,
 * createTextNode, attribute values): never as HTML. No library, no build step.
 */
"use strict";

(function () {
  /** The signed-in user's role (viewer, operator, admin): viewers get no action buttons. */
  const ROLE = document.body ? document.body.dataset.role || "" : "";
  const CAN_ACT = ROLE === "operator" || ROLE === "admin";
  const LIVE_MS = 3000;       // live view and series page
  const SLOW_MS = 10000;      // destinations, models, audit
  const READY_MS = 10000;     // readiness badge
  const RETRYABLE = ["succeeded", "failed", "cancelled", "superseded"];
  const CANCELLABLE = ["pending", "queued", "running"];

  // ------------------------------------------------------------------ DOM helpers

  /** Build an element: h("td", {class: "x", "data-id": 3, onclick: fn}, "text", child...). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on") && typeof value === "function") {
        el.addEventListener(key.slice(2), value);
      } else if (key === "class") {
        el.className = value;
      } else {
        el.setAttribute(key, value === true ? "" : String(value));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false || child === "") continue;
      if (Array.isArray(child)) append(el, child);
      else if (child instanceof Node) el.appendChild(child);
      else el.appendChild(document.createTextNode(String(child)));
    }
  }

  function replace(el, ...children) {
    if (!el) return;
    el.replaceChildren();
    append(el, children);
  }

  const $ = (selector) => document.querySelector(selector);

  // ------------------------------------------------------------------ formatting

  function pad(n) { return String(n).padStart(2, "0"); }

  /** Local time: "HH:MM:SS" today, "YYYY-MM-DD HH:MM:SS" otherwise; full ISO UTC as a tooltip. */
  function time(iso) {
    if (!iso) return h("span", {class: "muted"}, "—");
    const d = new Date(iso);
    if (isNaN(d)) return h("span", {}, String(iso));
    const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    const today = new Date().toDateString() === d.toDateString();
    const text = today ? clock
      : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock}`;
    return h("time", {datetime: iso, title: iso}, text);
  }

  function seconds(fromIso, toIso) {
    if (!fromIso || !toIso) return "";
    const s = (new Date(toIso) - new Date(fromIso)) / 1000;
    if (!isFinite(s) || s < 0) return "";
    return s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
  }

  /** The CSS tone of a state: ok (green), failed (red), waiting (amber) or neutral. */
  function tone(state) {
    if (["succeeded", "sent", "committed", "complete", "done", "ready", "released", "alive",
         "accepted"].includes(state)) return "ok";
    if (["failed", "rejected", "aborted", "dead"].includes(state)) return "failed";
    if (["pending", "queued", "running", "sending", "receiving", "waiting"].includes(state)) {
      return "waiting";
    }
    return "neutral";
  }

  function badge(state, label) {
    return h("span", {class: `state ${tone(state)} state-${state}`}, label || state);
  }

  function uid(value) { return h("code", {class: "uid", title: value}, value); }

  function table(headers, rows, empty) {
    if (!rows.length) return h("p", {class: "muted empty"}, empty || "Nothing yet.");
    return h("table", {},
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))),
      h("tbody", {}, rows));
  }

  function errorText(text, cls) {
    if (!text) return null;
    return h("pre", {class: cls || "error"}, text);
  }

  // ------------------------------------------------------------------ HTTP and actions

  /** The dashboard session's CSRF token, from the page's <meta name="csrf-token">. */
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") || "" : "";
  }

  /** The session ended (logout, expiry, disabled user): back to the login form. */
  function toLogin() {
    const next = `${window.location.pathname}${window.location.search}`;
    window.location.assign(`/login?next=${encodeURIComponent(next)}`);
  }

  /** GET or POST with the session cookie; writes carry the CSRF token. */
  async function send(method, url, body) {
    const headers = {Accept: "application/json"};
    if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "same-origin",
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) toLogin();
    return {status: response.status, ok: response.ok, data};
  }

  async function getJson(url) {
    const reply = await send("GET", url);
    if (!reply.ok) throw new Error(describe(reply));
    return reply.data;
  }

  /** The reply's message for people: ActionOut.message, HTTPException.detail, or validation. */
  function describe(reply) {
    const data = reply.data;
    if (data && typeof data.message === "string") return data.message;
    if (data && typeof data.detail === "string") return data.detail;
    if (data && Array.isArray(data.detail)) {
      return data.detail.map((d) => (d && d.msg) || JSON.stringify(d)).join("; ");
    }
    return `HTTP ${reply.status}`;
  }

  let flashTimer = null;

  function flash(text, ok) {
    const el = $("#flash");
    if (!el) return;
    el.textContent = text;
    el.className = `flash ${ok ? "ok" : "failed"}`;
    el.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { el.hidden = true; }, ok ? 8000 : 20000);
  }

  /** A button that POSTs to an action route and shows the reply's message or detail.
   *  None for a viewer: the API would answer 403. */
  function actionButton(label, url, opts) {
    if (!CAN_ACT) return null;
    const options = opts || {};
    const button = h("button", {type: "button", class: options.class || "action",
                                title: options.title});
    button.textContent = label;
    button.addEventListener("click", async () => {
      if (options.confirm && !window.confirm(options.confirm)) return;
      button.disabled = true;
      try {
        const reply = await send("POST", url, options.body);
        const text = options.describe ? options.describe(reply) : describe(reply);
        flash(text, reply.ok && !(options.okField && reply.data && !reply.data[options.okField]));
        if (options.after) options.after(reply);
      } catch (e) {
        flash(`${label} failed: ${e.message || e}`, false);
      } finally {
        button.disabled = false;
        refreshNow();
      }
    });
    return button;
  }

  // ------------------------------------------------------------------ polling

  let refresher = null;
  let refreshTimer = null;

  function poll(fn, ms) {
    let running = false;
    let again = false;
    refresher = async () => {
      if (running) { again = true; return; }  // one load at a time; rerun once it ends
      running = true;
      clearTimeout(refreshTimer);
      try {
        await fn();
        status("");
      } catch (e) {
        status(`Cannot load data: ${e.message || e}`, true);
      } finally {
        running = false;
      }
      if (again) { again = false; refresher(); return; }
      refreshTimer = setTimeout(refresher, document.hidden ? ms * 4 : ms);
    };
    refresher();
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refreshNow();
    });
  }

  function refreshNow() { if (refresher) refresher(); }

  function status(text, failed) {
    const el = $("#status");
    if (!el) return;
    el.textContent = text;
    el.className = failed ? "error" : "muted";
  }

  /** Re-render only when the data changed, so the page does not flicker or lose focus. */
  const lastData = new Map();
  function renderIfChanged(key, data, render) {
    const json = JSON.stringify(data);
    if (lastData.get(key) === json) return;
    lastData.set(key, json);
    render(data);
  }

  async function readiness() {
    const el = $("#ready");
    if (!el) return;
    let state = "failed";
    let text = "not ready";
    let details = [];
    try {
      const reply = await send("GET", "/readyz");
      const checks = (reply.data && reply.data.checks) || {};
      if (reply.ok && reply.data && reply.data.ready) {
        state = "ok";
        text = "ready";
        details = Object.entries(checks).map(([name, c]) => `${name}: ${c.detail}`);
      } else {
        details = Object.entries(checks).filter(([, c]) => !c.ok)
          .map(([name, c]) => `${name}: ${c.detail}`);
        if (!details.length) details = [`HTTP ${reply.status}`];
      }
    } catch (e) {
      text = "unreachable";
      details = ["the node's HTTP server does not answer"];
    }
    el.className = `ready ${state}`;
    el.title = details.join("\n");
    replace(el, h("span", {class: "dot"}), h("span", {class: "ready-text"}, text),
      state === "ok" ? null : h("span", {class: "ready-detail"}, details.join("; ")));
  }

  // ------------------------------------------------------------------ live view (/)

  function deliveryLine(d) {
    const waiting = tone(d.state) === "waiting";
    return h("li", {class: `delivery ${tone(d.state)}`, "data-delivery": d.id},
      h("span", {class: "destination"}, d.destination), " ",
      h("span", {class: "kind"}, d.kind || `result ${d.result_id}`), " ",
      badge(d.state),
      d.sent_at ? [" ", time(d.sent_at)] : null,
      d.committed_at ? [" committed ", time(d.committed_at)] : null,
      d.attempts ? h("span", {class: "muted"}, ` attempt ${d.attempts}`) : null,
      waiting && d.next_attempt_at
        ? h("span", {class: "muted"}, " next try ", time(d.next_attempt_at)) : null,
      " ",
      actionButton("Resend", `/api/v1/deliveries/${d.id}/resend`,
        {class: "action small", title: `send this ${d.kind || "result"} to ${d.destination} again`}),
      d.error ? h("div", {class: "reason error"}, d.error) : null);
  }

  function jobBlock(brief, job, deliveries) {
    const j = job || brief;
    const state = j.state;
    const times = [];
    if (job) {
      if (job.queued_at) times.push("queued ", time(job.queued_at));
      if (job.started_at) times.push(" · started ", time(job.started_at));
      if (job.finished_at) {
        times.push(" · finished ", time(job.finished_at));
        const took = seconds(job.started_at, job.finished_at);
        if (took) times.push(` (${took})`);
      }
      if (job.worker) times.push(` · on ${job.worker}`);
    }
    const buttons = [];
    if (RETRYABLE.includes(state)) {
      buttons.push(actionButton("Retry", `/api/v1/jobs/${j.id}/retry`,
        {class: "action retry", title: "run this model on the series again (a new job)"}));
    }
    if (CANCELLABLE.includes(state)) {
      buttons.push(actionButton("Cancel", `/api/v1/jobs/${j.id}/cancel`,
        {class: "action cancel", confirm: `Cancel job ${j.id}?`}));
    }
    const sorted = deliveries.slice().sort((a, b) =>
      a.destination.localeCompare(b.destination) || String(a.kind).localeCompare(String(b.kind)));
    return h("div", {class: `job ${tone(state)}`, "data-job": j.id},
      h("div", {class: "job-head"},
        h("span", {class: "job-id"}, `job ${j.id}`), " ",
        h("span", {class: "model"}, j.model_name), " ",
        badge(state), " ",
        j.priority === "stat" ? badge("stat", "STAT") : null, " ",
        h("span", {class: "times muted"}, times), " ",
        buttons),
      job && job.error ? h("div", {class: "reason error job-error"}, job.error) : null,
      sorted.length ? h("ul", {class: "deliveries"}, sorted.map(deliveryLine)) : null);
  }

  function seriesBlock(s, jobsById, deliveriesByJob) {
    const rules = new Set();
    for (const job of s.jobs) {
      for (const name of (job.rule_names || "").split(",")) if (name) rules.add(name);
    }
    const received = h("li", {class: "stage ok"},
      h("span", {class: "stage-name"}, "received"), " ", time(s.first_received_at),
      s.last_received_at !== s.first_received_at ? [" – ", time(s.last_received_at)] : null,
      h("div", {class: "stage-detail"},
        `${s.instance_count}${s.expected_count ? ` of ${s.expected_count}` : ""} instances from `,
        h("span", {class: "ae"}, s.calling_ae_title)));
    const complete = s.completed_at
      ? h("li", {class: "stage ok"}, h("span", {class: "stage-name"}, "complete"), " ",
        time(s.completed_at), h("div", {class: "stage-detail"}, s.completion_reason || ""))
      : h("li", {class: "stage waiting"}, h("span", {class: "stage-name"}, "complete"), " ",
        h("span", {class: "muted"}, s.state === "receiving" ? "receiving…" : s.state),
        s.state === "receiving"
          ? h("div", {class: "stage-detail"}, actionButton("Force complete",
            `/api/v1/series/${s.id}/complete`,
            {class: "action complete", confirm: `Mark series ${s.id} complete now?`}))
          : null);
    let routedDetail = "";
    if (s.routed_at) {
      routedDetail = rules.size ? `rule ${[...rules].join(", ")}`
        : s.jobs.length ? "fallback" : "no model (stored only)";
    }
    const routed = s.routed_at
      ? h("li", {class: "stage ok"}, h("span", {class: "stage-name"}, "routed"), " ",
        time(s.routed_at), h("div", {class: "stage-detail rules"}, routedDetail))
      : h("li", {class: "stage waiting"}, h("span", {class: "stage-name"}, "routed"), " ",
        h("span", {class: "muted"}, "not yet"));
    const stages = [received, complete, routed];
    if (s.purged_at) {
      stages.push(h("li", {class: "stage neutral"}, h("span", {class: "stage-name"}, "purged"),
        " ", time(s.purged_at)));
    }
    const jobs = s.jobs.slice().sort((a, b) => a.id - b.id);
    return h("div", {class: "series", "data-series": s.id},
      h("div", {class: "series-head"},
        h("a", {href: `/series/${s.id}`}, `Series ${s.id}`), " ",
        h("span", {class: "modality"}, s.modality || "?"), " ",
        badge(s.state), " ", uid(s.series_instance_uid)),
      h("ol", {class: "pipeline"}, stages),
      jobs.length
        ? h("div", {class: "jobs"}, jobs.map((brief) =>
          jobBlock(brief, jobsById.get(brief.id), deliveriesByJob.get(brief.id) || [])))
        : null);
  }

  function renderStudies(data) {
    const {studies, jobs, deliveries} = data;
    const jobsById = new Map(jobs.map((job) => [job.id, job]));
    const deliveriesByJob = new Map();
    for (const d of deliveries) {
      if (!deliveriesByJob.has(d.job_id)) deliveriesByJob.set(d.job_id, []);
      deliveriesByJob.get(d.job_id).push(d);
    }
    const container = $("#studies");
    if (!studies.items.length) {
      replace(container, h("p", {class: "muted empty"},
        "No study received yet. Send one to the node's DICOM port."));
      return;
    }
    replace(container,
      h("p", {class: "muted"}, `${studies.items.length} of ${studies.total} studies, newest first`),
      studies.items.map((study) => {
        const counts = Object.entries(study.jobs).map(([state, n]) => badge(state, `${n} ${state}`));
        return h("section", {class: "study", "data-study": study.study_instance_uid},
          h("div", {class: "study-head"},
            h("span", {class: "label"}, "Study"), " ", uid(study.study_instance_uid), " ",
            badge(study.state)),
          h("div", {class: "study-meta muted"},
            `${study.modalities.join(", ") || "?"} · ${study.series_count} series · `,
            `${study.instance_count} instances · from `,
            h("span", {class: "ae"}, study.calling_ae_titles.join(", ")), " · last received ",
            time(study.last_received_at), counts.length ? " · jobs " : "", counts),
          study.series.map((s) => seriesBlock(s, jobsById, deliveriesByJob)));
      }));
  }

  async function loadStudies() {
    const studies = await getJson("/api/v1/studies?limit=20");
    let jobs = [];
    let deliveries = [];
    if (studies.items.length) {
      // Every job and delivery of these studies was created after their oldest first instance.
      const since = studies.items.map((s) => s.first_received_at).sort()[0];
      const window = `since=${encodeURIComponent(since)}&limit=500`;
      const [jobPage, deliveryPage] = await Promise.all([
        getJson(`/api/v1/jobs?${window}`), getJson(`/api/v1/deliveries?${window}`)]);
      jobs = jobPage.items;
      deliveries = deliveryPage.items;
    }
    renderIfChanged("studies", {studies, jobs, deliveries}, renderStudies);
  }

  // ------------------------------------------------------------------ series page

  function renderSeries(s) {
    replace($("#series-summary"), h("dl", {class: "summary"},
      h("dt", {}, "Series UID"), h("dd", {}, uid(s.series_instance_uid)),
      h("dt", {}, "Study UID"), h("dd", {}, uid(s.study_instance_uid)),
      h("dt", {}, "Modality"), h("dd", {}, s.modality || "?"),
      h("dt", {}, "State"), h("dd", {}, badge(s.state), " ",
        s.state === "receiving" ? actionButton("Force complete", `/api/v1/series/${s.id}/complete`,
          {class: "action complete", confirm: `Mark series ${s.id} complete now?`}) : null),
      h("dt", {}, "Instances"),
      h("dd", {}, `${s.instance_count}${s.expected_count ? ` of ${s.expected_count}` : ""}`),
      h("dt", {}, "Sender"), h("dd", {}, h("span", {class: "ae"}, s.calling_ae_title),
        s.called_ae_title ? [" → ", h("span", {class: "ae"}, s.called_ae_title)] : null,
        s.peer_address ? ` from ${s.peer_address}` : null)));

    replace($("#stages"), s.stages.map((stage) => h("li", {class: `stage ${tone(stage.state)}`},
      h("span", {class: "at"}, time(stage.at)), " ",
      h("span", {class: "stage-name"}, stage.name),
      // A waiting stage's detail is the reason its last attempt failed (a delivery's error).
      stage.detail ? h("div", {class: `stage-detail${stage.state === "done" ? "" : " error"}`},
        stage.detail) : null)));

    replace($("#jobs"), table(
      ["Job", "Model", "State", "Rules", "Priority", "Attempts", "Worker", "Queued", "Started",
       "Finished", "Actions"],
      s.job_details.map((j) => [
        h("tr", {"data-job": j.id, class: tone(j.state)},
          h("td", {}, String(j.id)),
          h("td", {}, j.model_name, j.model_version ? ` ${j.model_version}` : ""),
          h("td", {}, badge(j.state)),
          h("td", {}, j.rule_names || "fallback"),
          h("td", {}, j.priority),
          h("td", {}, String(j.attempts)),
          h("td", {}, j.worker || ""),
          h("td", {}, time(j.queued_at)),
          h("td", {}, time(j.started_at)),
          h("td", {}, time(j.finished_at), j.started_at && j.finished_at
            ? ` (${seconds(j.started_at, j.finished_at)})` : ""),
          h("td", {class: "actions"},
            RETRYABLE.includes(j.state) ? actionButton("Retry", `/api/v1/jobs/${j.id}/retry`,
              {class: "action retry"}) : null,
            CANCELLABLE.includes(j.state) ? actionButton("Cancel", `/api/v1/jobs/${j.id}/cancel`,
              {class: "action cancel", confirm: `Cancel job ${j.id}?`}) : null)),
        j.error ? h("tr", {class: "error-row"},
          h("td", {colspan: 11}, errorText(j.error))) : null,
      ]), "No job: the series has not been routed to a model."));

    replace($("#results"), s.results.length ? s.results.map((r) => h("div", {class: "result",
      "data-result": r.id},
      h("div", {class: "result-head"},
        h("strong", {}, `${r.kind} `), `result ${r.id} of job ${r.job_id} · created `,
        time(r.created_at), " ", uid(r.sop_instance_uid), " ",
        actionButton("Resend to all", `/api/v1/results/${r.id}/resend`,
          {class: "action resend-result", body: {},
           title: "send this result again to every destination it went to"})),
      segments(r.summary),
      table(["Destination", "State", "Attempts", "Status", "Sent", "Committed", "Next try",
             "Reason", ""],
        r.deliveries.map((d) => h("tr", {"data-delivery": d.id, class: tone(d.state)},
          h("td", {}, d.destination),
          h("td", {}, badge(d.state)),
          h("td", {}, String(d.attempts)),
          h("td", {}, d.status === null ? "" : `0x${d.status.toString(16).toUpperCase()
            .padStart(4, "0")}`),
          h("td", {}, time(d.sent_at)),
          h("td", {}, d.committed_at ? time(d.committed_at) : ""),
          h("td", {}, tone(d.state) === "waiting" ? time(d.next_attempt_at) : ""),
          h("td", {}, errorText(d.error, "reason error")),
          h("td", {}, actionButton("Resend", `/api/v1/deliveries/${d.id}/resend`,
            {class: "action small"})))),
        "No delivery: no destination was routed for this result.")))
      : h("p", {class: "muted empty"}, "No result yet."));
  }

  function segments(summary) {
    if (!summary || !Array.isArray(summary.segments) || !summary.segments.length) return null;
    return h("p", {class: "segments muted"}, summary.segments.map((seg, i) => [
      i ? " · " : "", `${seg.label}`,
      seg.volume_ml !== undefined && seg.volume_ml !== null ? ` ${Number(seg.volume_ml).toFixed(1)} mL` : ""]));
  }

  async function loadSeries() {
    const id = document.body.dataset.seriesId;
    const reply = await send("GET", `/api/v1/series/${encodeURIComponent(id)}`);
    if (reply.status === 404) {
      replace($("#series-summary"), h("p", {class: "error"}, describe(reply)));
      return;
    }
    if (!reply.ok) throw new Error(describe(reply));
    renderIfChanged("series", reply.data, renderSeries);
  }

  // ------------------------------------------------------------------ destinations

  const echoResults = new Map();

  function renderDestinations(rows) {
    replace($("#destinations"), table(
      ["Name", "Kind", "Address", "Commitment", "Deliveries", "Actions", "C-ECHO"],
      rows.map((d) => {
        const states = Object.entries(d.deliveries).sort();
        const failed = d.deliveries.failed || 0;
        const echoCell = h("td", {class: "echo"});
        const echo = echoResults.get(d.name);
        if (echo) replace(echoCell, echo());
        return h("tr", {"data-destination": d.name},
          h("td", {}, h("strong", {}, d.name)),
          h("td", {}, d.kind),
          h("td", {}, h("code", {}, d.address)),
          h("td", {}, d.storage_commitment ? "yes" : "no"),
          h("td", {}, states.length
            ? states.map(([state, n]) => [badge(state, `${n} ${state}`), " "])
            : h("span", {class: "muted"}, "none")),
          h("td", {class: "actions"},
            d.kind === "dicom" ? actionButton("C-ECHO", `/api/v1/destinations/${encodeURIComponent(
              d.name)}/echo`, {class: "action echo-button", okField: "ok",
              describe: (reply) => reply.ok
                ? `C-ECHO ${d.name}: ${reply.data.ok ? "ok" : "failed"} (${reply.data.detail})`
                : describe(reply),
              after: (reply) => {
                const render = () => reply.ok
                  ? [badge(reply.data.ok ? "ok" : "failed", reply.data.ok ? "ok" : "failed"), " ",
                     reply.data.detail, reply.data.status === null ? ""
                       : ` (status ${reply.data.status})`]
                  : h("span", {class: "error"}, describe(reply));
                echoResults.set(d.name, render);
                lastData.delete("destinations");
              }}) : null, " ",
            failed ? actionButton(`Retry ${failed} failed`,
              `/api/v1/deliveries/retry-failed?destination=${encodeURIComponent(d.name)}`,
              {class: "action retry-failed"}) : null),
          echoCell);
      }), "No destination configured: results are kept but not sent."));
  }

  function renderDeliveries(page) {
    replace($("#deliveries"), table(
      ["Delivery", "Destination", "Result", "Job", "State", "Attempts", "Created", "Sent",
       "Reason", ""],
      page.items.map((d) => h("tr", {"data-delivery": d.id, class: tone(d.state)},
        h("td", {}, String(d.id)),
        h("td", {}, d.destination),
        h("td", {}, d.kind),
        h("td", {}, String(d.job_id)),
        h("td", {}, badge(d.state)),
        h("td", {}, String(d.attempts)),
        h("td", {}, time(d.created_at)),
        h("td", {}, time(d.sent_at)),
        h("td", {}, errorText(d.error, "reason error")),
        h("td", {}, actionButton("Resend", `/api/v1/deliveries/${d.id}/resend`,
          {class: "action small"})))),
      "No delivery."));
  }

  async function loadDestinations() {
    const state = $("#delivery-state") ? $("#delivery-state").value : "";
    const query = state ? `&state=${encodeURIComponent(state)}` : "";
    const [rows, deliveries] = await Promise.all([
      getJson("/api/v1/destinations"), getJson(`/api/v1/deliveries?limit=50${query}`)]);
    renderIfChanged("destinations", rows, renderDestinations);
    renderIfChanged("deliveries", deliveries, renderDeliveries);
  }

  // ------------------------------------------------------------------ models and workers

  function megabytes(value) {
    return value === null || value === undefined ? "" : `${Math.round(value)} MB`;
  }

  function renderModels(data) {
    const {models, workers} = data;
    replace($("#models"), table(
      ["Model", "Version", "Kind", "Queue", "Device", "Routed", "Loaded on"],
      models.map((m) => h("tr", {"data-model": m.name},
        h("td", {}, h("strong", {}, m.name)),
        h("td", {}, m.version),
        h("td", {}, m.kind),
        h("td", {}, m.queue),
        h("td", {}, m.device || "auto"),
        h("td", {}, m.routed ? "yes" : h("span", {class: "muted"}, "no rule")),
        h("td", {}, m.loaded_on.length ? m.loaded_on.join(", ")
          : h("span", {class: "state waiting"}, "not loaded")))),
      "No model declared."));
    replace($("#workers"), table(
      ["Worker", "Queues", "Device", "Models", "GPU memory", "Started", "Last report", "Alive"],
      workers.map((w) => h("tr", {"data-worker": w.name, class: w.alive ? "ok" : "failed"},
        h("td", {}, h("strong", {}, w.name)),
        h("td", {}, w.queues.join(", ")),
        h("td", {}, w.device),
        h("td", {}, w.models.map((m) => `${m.name} ${m.version || ""}`.trim()).join(", ")),
        h("td", {}, w.gpu_memory_total_mb
          ? `${megabytes(w.gpu_memory_allocated_mb) || "?"} of ${megabytes(w.gpu_memory_total_mb)}`
          : h("span", {class: "muted"}, "—")),
        h("td", {}, time(w.started_at)),
        h("td", {}, time(w.heartbeat_at)),
        h("td", {}, w.alive ? badge("alive") : badge("dead", "not reporting")))),
      "No worker has reported yet."));
  }

  async function loadModels() {
    const [models, workers] = await Promise.all([
      getJson("/api/v1/models"), getJson("/api/v1/workers")]);
    renderIfChanged("models", {models, workers}, renderModels);
  }

  // ------------------------------------------------------------------ rules

  function value(v) {
    if (Array.isArray(v)) return `[${v.map(value).join(", ")}]`;
    if (v && typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  /** A condition tree as nested lists: "Modality = CT", "all of: ...". */
  function condition(node) {
    if (!node || typeof node !== "object") return h("span", {}, value(node));
    for (const key of ["all", "any"]) {
      if (Array.isArray(node[key])) {
        return h("span", {}, key === "all" ? "all of:" : "any of:",
          h("ul", {class: "condition"}, node[key].map((child) => h("li", {}, condition(child)))));
      }
    }
    if (node.not) return h("span", {}, "not: ", condition(node.not));
    const subject = node.attribute !== undefined ? node.attribute
      : node.association !== undefined ? `association ${node.association}` : "?";
    let text;
    if (node.equals !== undefined) text = `${subject} = ${value(node.equals)}`;
    else if (node.in !== undefined) text = `${subject} in ${value(node.in)}`;
    else if (node.regex !== undefined) text = `${subject} matches /${node.regex}/`;
    else if (node.range !== undefined) {
      const low = node.range.min === undefined || node.range.min === null ? "-∞" : node.range.min;
      const high = node.range.max === undefined || node.range.max === null ? "+∞" : node.range.max;
      text = `${subject} between ${low} and ${high}`;
    } else if (node.present !== undefined) {
      text = `${subject} ${node.present ? "is present" : "is absent or empty"}`;
    } else text = `${subject} ${value(node)}`;
    if (node.case_sensitive !== undefined) {
      text += node.case_sensitive ? " (case-sensitive)" : " (ignoring case)";
    }
    return h("code", {class: "cond"}, text);
  }

  function extras(obj, known) {
    const rest = Object.entries(obj).filter(([key]) => !known.includes(key));
    return rest.map(([key, v]) => h("div", {class: "muted"}, `${key}: ${value(v)}`));
  }

  function renderRules(data) {
    const known = ["name", "when", "models", "destinations", "priority", "completion",
                   "quiet_period_s", "final"];
    replace($("#rules"), h("p", {class: "muted"}, `Configuration version ${data.config_version}`),
      table(
      ["#", "Rule", "When", "Models", "Destinations", "Priority", "Completion", "Final"],
      data.rules.map((r, i) => h("tr", {"data-rule": r.name},
        h("td", {}, String(i + 1)),
        h("td", {}, h("strong", {}, r.name), extras(r, known)),
        h("td", {}, r.when ? condition(r.when) : h("span", {class: "muted"}, "every series")),
        h("td", {}, r.models && r.models.length ? r.models.join(", ")
          : h("span", {class: "muted"}, "none (store, do not analyse)")),
        h("td", {}, r.destinations ? r.destinations.join(", ")
          : h("span", {class: "muted"}, "all destinations")),
        h("td", {}, r.priority === "stat" ? badge("stat", "STAT") : (r.priority || "routine")),
        h("td", {}, r.completion || "series",
          r.quiet_period_s ? `, quiet ${r.quiet_period_s} s` : ""),
        h("td", {}, r.final ? "yes: later rules are skipped" : ""))),
      "No rule: every series gets the fallback."));
    const fb = data.fallback || {};
    replace($("#fallback"), h("p", {},
      fb.models && fb.models.length ? `Models: ${fb.models.join(", ")}`
        : "No model: a series no rule matches is stored, not analysed.",
      fb.destinations ? ` · destinations: ${fb.destinations.join(", ")}` : "",
      extras(fb, ["models", "destinations"])));
  }

  async function loadRules() {
    renderIfChanged("rules", await getJson("/api/v1/rules"), renderRules);
  }

  // ------------------------------------------------------------------ audit

  function auditQuery() {
    const form = $("#audit-filter");
    const params = new URLSearchParams();
    const exportParams = new URLSearchParams();
    if (form) {
      const data = new FormData(form);
      for (const key of ["action", "actor"]) {
        const v = String(data.get(key) || "").trim();
        if (v) params.set(key, v);
      }
      const since = String(data.get("since") || "");
      const until = String(data.get("until") || "");
      if (since) {
        const iso = new Date(`${since}T00:00:00`).toISOString();
        params.set("since", iso);
        exportParams.set("since", iso);
      }
      if (until) {  // the "To" day is included: export until the next midnight
        const end = new Date(`${until}T00:00:00`);
        end.setDate(end.getDate() + 1);
        params.set("until", end.toISOString());
        exportParams.set("until", end.toISOString());
      }
    }
    for (const format of ["csv", "json"]) {
      const link = $(`#export-${format}`);
      const p = new URLSearchParams(exportParams);
      p.set("format", format);
      if (link) link.setAttribute("href", `/api/v1/audit/export?${p}`);
    }
    params.set("limit", "100");
    return params.toString();
  }

  function renderAudit(page) {
    replace($("#audit"),
      h("p", {class: "muted"}, `${page.items.length} of ${page.total} events, newest first`),
      table(["Time", "Actor", "Action", "Target", "Detail"],
        page.items.map((e) => h("tr", {"data-audit": e.id,
          class: /failed|rejected|refused/.test(e.action) ? "failed" : ""},
          h("td", {}, time(e.at)),
          h("td", {}, h("span", {class: "ae"}, e.actor)),
          h("td", {}, h("code", {}, e.action)),
          h("td", {}, `${e.target_type} ${e.target_id}`),
          h("td", {class: "detail"}, Object.entries(e.detail || {}).map(([key, v]) =>
            h("span", {class: "kv"}, h("span", {class: "muted"}, `${key}=`), value(v)))))),
        "No audit event."));
  }

  async function loadAudit() {
    renderIfChanged("audit", await getJson(`/api/v1/audit?${auditQuery()}`), renderAudit);
  }

  // ------------------------------------------------------------------ start

  const pages = {
    live: [loadStudies, LIVE_MS],
    series: [loadSeries, LIVE_MS],
    destinations: [loadDestinations, SLOW_MS],
    models: [loadModels, SLOW_MS],
    rules: [loadRules, SLOW_MS * 3],
    audit: [loadAudit, SLOW_MS],
  };

  function start() {
    readiness();
    setInterval(readiness, READY_MS);
    const page = pages[document.body.dataset.page];
    if (page) poll(page[0], page[1]);
    const filter = $("#audit-filter");
    if (filter) {
      filter.addEventListener("submit", (event) => { event.preventDefault(); refreshNow(); });
      filter.addEventListener("change", refreshNow);
    }
    const stateSelect = $("#delivery-state");
    if (stateSelect) stateSelect.addEventListener("change", refreshNow);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
