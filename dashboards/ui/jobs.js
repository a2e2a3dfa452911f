// Jobs: the list (state, progress, loss) and one job's detail: state history, live loss curve from
// /v1/jobs/<id>/curve, the tail of its driver's log, attempts and spec.

import { api, describe } from "./api.js";
import { lineChart } from "./charts.js";
import { LiveTable, badge, el, fmtAge, fmtNum, fmtTime, keyed, kv, progressBar, replace } from "./dom.js";
import { enumValues, terminalValues } from "./schema.js";

const LIST_LIMIT = 200;
const LOG_TAIL_LINES = 200;
const LOG_TAIL_BYTES = 64 * 1024; // what one poll asks of the log: its end, never the whole log

function progressCell(job) {
  const m = job.metrics || {};
  if (typeof m.step !== "number" || typeof m.total_steps !== "number") return "";
  return el("div", { class: "row" }, progressBar(m.step, m.total_steps), `${m.step}/${m.total_steps}`);
}

export function jobsPage(root) {
  const table = new LiveTable([
    { key: "name", label: "Name", cell: (j) => el("a", { href: `#/jobs/${j.id}` }, j.name) },
    { key: "id", label: "Id" },
    { key: "kind", label: "Kind" },
    { key: "state", label: "State", cell: (j) => badge(j.state) },
    { key: "progress", label: "Progress", value: (j) => (j.metrics?.total_steps ? j.metrics.step / j.metrics.total_steps : null),
      cell: progressCell },
    { key: "loss", label: "Loss", num: true, value: (j) => j.metrics?.loss ?? null },
    { key: "team", label: "Team" },
    { key: "priority", label: "Priority" },
    { key: "created_at", label: "Created", value: (j) => j.created_at, cell: (j) => fmtAge(j.created_at) },
  ], { onRowClick: (j) => { location.hash = `#/jobs/${j.id}`; }, rowId: (j) => j.id, empty: "no jobs" });
  const total = el("span", { class: "muted" });
  // The states to filter by: the API's JobState enum, from its schema.
  const state = el("select", { id: "state-filter", onchange: () => refresh() }, el("option", { value: "" }, "any state"));
  replace(root, el("h1", {}, "Jobs ", total), el("label", { class: "inline" }, "State", state), table.node);
  let filling = null;

  async function refresh() {
    filling ??= enumValues("JobState").then((values) => state.append(...values.map((v) => el("option", { value: v }, v))))
      .catch((e) => { filling = null; throw e; });
    await filling;
    const page = await api(`/v1/jobs?limit=${LIST_LIMIT}${state.value ? `&state=${state.value}` : ""}`);
    total.textContent = page.count > page.data.length ? `(newest ${page.data.length} of ${page.count})` : "";
    table.update(page.data);
  }

  return { refresh };
}

function historyTable(job) {
  return el("table", {},
    el("thead", {}, el("tr", {}, ["At", "From", "To", "Reason"].map((h) => el("th", {}, h)))),
    el("tbody", {}, job.history.map((e) => el("tr", {},
      el("td", {}, fmtTime(e.at)), el("td", {}, e.from_state || ""), el("td", {}, badge(e.to_state)),
      el("td", {}, e.reason)))));
}

function attemptsTable(job) {
  return el("table", {},
    el("thead", {}, el("tr", {}, ["#", "Ray submission", "Submitted", "Ended", "Ray status", "Message"]
      .map((h) => el("th", {}, h)))),
    el("tbody", {}, job.attempt_history.map((a) => el("tr", {},
      el("td", {}, a.number), el("td", {}, a.ray_submission_id), el("td", {}, fmtTime(a.submitted_at)),
      el("td", {}, fmtTime(a.ended_at)), el("td", {}, a.ray_status || ""), el("td", {}, a.ray_message || "")))));
}

function curveChart(curve) {
  const attempts = [...new Set(curve.points.map((p) => p.attempt))];
  return lineChart({
    title: "training loss",
    series: attempts.map((n, i) => ({
      name: `attempt ${n}`, colour: i,
      points: curve.points.filter((p) => p.attempt === n).map((p) => [p.step, p.loss]),
    })),
    empty: curve.error ? `curve unavailable: ${curve.error}` : "no progress reported yet",
  });
}

function metricsList(job) {
  const m = job.metrics || {};
  return kv(Object.keys(m).sort().map((k) => [k, fmtNum(m[k])]));
}

export function jobDetailPage(root, id) {
  const head = el("div");
  const chart = el("div");
  const logs = el("pre", { id: "logs" });
  const history = el("div");
  const attempts = el("div");
  const spec = el("pre", { id: "spec" });
  const metrics = el("div");
  replace(root, head,
    el("div", { class: "grid" },
      el("section", { class: "card" }, el("h2", {}, "Loss"), chart),
      el("section", { class: "card" }, el("h2", {}, "Latest metrics"), metrics)),
    el("section", { class: "card" }, el("h2", {}, `Log (last ${LOG_TAIL_LINES} lines)`), logs),
    el("section", { class: "card" }, el("h2", {}, "State history"), history),
    el("section", { class: "card" }, el("h2", {}, "Attempts"), attempts),
    el("details", { class: "card" }, el("summary", {}, "Spec"), spec));
  let done = false;
  let logShown = null; // attempt and end offset of the log text shown: an unchanged log is not redrawn
  let curveShown = null; // size and last point of the curve drawn, likewise

  async function cancel(button) {
    button.disabled = true;
    await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
  }

  return {
    async refresh() {
      if (done) return; // a finished job does not change: one last read is enough
      const [job, terminal] = await Promise.all([api(`/v1/jobs/${id}`), terminalValues("JobState")]);
      // Both read Ray: when it is away (503) the job's stored state still shows.
      const [curve, log] = await Promise.all([
        api(`/v1/jobs/${id}/curve`).catch((e) => ({ points: [], error: describe(e) })),
        api(`/v1/jobs/${id}/logs?tail=${LOG_TAIL_BYTES}`).catch((e) => ({ error: describe(e) }))]);
      const stop = el("button", { class: "danger", type: "button", disabled: job.cancel_requested,
                                  onclick: (e) => cancel(e.target) }, job.cancel_requested ? "Cancelling" : "Cancel");
      const shown = [job.name, job.state, job.kind, job.team, job.owner, job.priority, job.message, job.queue_position,
        job.queue_reason, job.metrics?.step, job.metrics?.total_steps, job.attempts, job.max_retries, job.cancel_requested];
      keyed(head, JSON.stringify(shown), () => [
        el("h1", {}, el("span", { id: "job-name" }, job.name), " ", badge(job.state)),
        el("div", { class: "card" },
          kv([["id", job.id], ["kind", job.kind], ["team", `${job.team} (${job.owner})`], ["priority", job.priority],
              ["message", job.message], ["queue", job.queue_position ? `#${job.queue_position}: ${job.queue_reason || ""}` : ""],
              ["progress", progressCell(job)], ["attempts", `${job.attempts} of ${job.max_retries + 1}`],
              ["created", fmtTime(job.created_at)]]),
          terminal.has(job.state) ? null : el("p", {}, stop))]);
      const curveKey = curve.error ? null : JSON.stringify([curve.points.length, curve.points.at(-1)]);
      if (curveKey === null || curveKey !== curveShown) replace(chart, curveChart(curve));
      curveShown = curveKey;
      keyed(metrics, JSON.stringify(job.metrics || {}), () => metricsList(job));
      const logKey = log.error ? null : `${log.attempt}:${log.end}`;
      if (logKey === null || logKey !== logShown) {
        logs.textContent = log.error ? `(log unavailable: ${log.error})`
          : log.logs ? log.logs.split("\n").slice(-LOG_TAIL_LINES).join("\n") : "(no log yet)";
        logs.scrollTop = logs.scrollHeight; // a tail: show its end
      }
      logShown = logKey;
      keyed(history, JSON.stringify(job.history), () => historyTable(job));
      keyed(attempts, JSON.stringify(job.attempt_history), () => attemptsTable(job));
      const specText = JSON.stringify(job.spec, null, 2);
      if (spec.textContent !== specText) spec.textContent = specText;
      done = terminal.has(job.state);
    },
  };
}
