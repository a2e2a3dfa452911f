// Deployments: the list (status, replicas, base URL) and one deployment: what Serve says of it, and
// its replicas' serving figures, the same as Grafana's serving row (time to first token, time per
// output token, queue wait, batch size, tokens/s, requests by status), read through the service's
// /v1/deployments/<id>/stats (the user's token; the service asks the replicas with its stats key).

import { api, describe } from "./api.js";
import { LiveTable, badge, el, fmtAge, fmtNum, fmtTime, keyed, kv } from "./dom.js";

const LIST_LIMIT = 200;

function replicaText(d) {
  return Object.entries(d.replicas || {}).map(([state, n]) => `${n} ${state}`).join(", ");
}

export function deploymentsPage(root) {
  const table = new LiveTable([
    { key: "name", label: "Name", cell: (d) => el("a", { href: `#/deployments/${d.id}` }, d.name) },
    { key: "id", label: "Id" },
    { key: "status", label: "Status", cell: (d) => badge(d.status) },
    { key: "replicas", label: "Replicas", value: replicaText },
    { key: "source", label: "Serves" },
    { key: "base_url", label: "OpenAI base URL" },
    { key: "team", label: "Team" },
    { key: "created_at", label: "Created", value: (d) => d.created_at, cell: (d) => fmtAge(d.created_at) },
  ], { onRowClick: (d) => { location.hash = `#/deployments/${d.id}`; }, rowId: (d) => d.id, empty: "no deployments" });
  root.append(el("h1", {}, "Deployments"), table.node);
  return {
    async refresh() {
      table.update((await api(`/v1/deployments?limit=${LIST_LIMIT}`)).data);
    },
  };
}

const ms = (p50, p95) => (p50 === null || p50 === undefined ? "" : `${fmtNum(p50, 3)} / ${fmtNum(p95, 3)}`);
const counts = (map) => Object.entries(map || {}).map(([k, n]) => `${k}: ${n}`).join(", ");

function figuresTable() {
  return new LiveTable([
    { key: "replica", label: "Replica" },
    { key: "ttft", label: "TTFT p50 / p95 (ms)", num: true, value: (r) => r.ttft_ms_p50, cell: (r) => ms(r.ttft_ms_p50, r.ttft_ms_p95) },
    { key: "tpot", label: "Time per output token p50 / p95 (ms)", num: true, value: (r) => r.tpot_ms_p50,
      cell: (r) => ms(r.tpot_ms_p50, r.tpot_ms_p95) },
    { key: "queue", label: "Queue wait p50 / p95 (ms)", num: true, value: (r) => r.queue_wait_ms_p50,
      cell: (r) => ms(r.queue_wait_ms_p50, r.queue_wait_ms_p95) },
    { key: "mean_batch_rows", label: "Mean batch (rows)", num: true },
    { key: "prompt_tokens_per_s", label: "Prompt tokens/s", num: true },
    { key: "completion_tokens_per_s", label: "Completion tokens/s", num: true },
    { key: "running_rows", label: "Rows running", num: true },
    { key: "requests", label: "Requests", num: true },
    { key: "status", label: "By status", value: (r) => counts(r.requests_by_status) },
    { key: "batches", label: "Batch sizes (rows: batches)", value: (r) => counts(r.batch_sizes) },
  ], { rowId: (r) => r.replica, empty: "no replica answered yet", filterLabel: "Filter replicas" });
}

export function deploymentDetailPage(root, id) {
  const head = el("div");
  const about = el("div");
  const message = el("p", { id: "stats-message", class: "muted" });
  const figures = figuresTable();
  root.append(head, about,
    el("section", { class: "card", id: "serving-figures" },
      el("h2", {}, "Serving figures"),
      el("p", { class: "hint" }, "Per replica, read from it now: latencies over its latest 1,000 rows, tokens/s over "
        + "the last minute, counts since it started (Grafana's serving row shows the same series over time)."),
      message, figures.node));
  return {
    async refresh() {
      const d = await api(`/v1/deployments/${id}`);
      keyed(head, `${d.name}\n${d.status}`, () => el("h1", {}, el("span", { id: "deployment-name" }, d.name), " ",
                                                      badge(d.status)));
      const pairs = [["id", d.id], ["status", d.status], ["message", d.message], ["serves", d.source],
        ["checkpoint", d.checkpoint], ["OpenAI base URL", d.base_url], ["model", d.name], ["replicas", replicaText(d)],
        ["team", `${d.team} (${d.owner})`], ["created", fmtTime(d.created_at)], ["checked", fmtTime(d.checked_at)]];
      keyed(about, JSON.stringify(pairs), () => el("div", { class: "card" }, kv(pairs)));
      let stats;
      try {
        stats = await api(`/v1/deployments/${id}/stats`);
      } catch (e) {
        message.textContent = `figures unavailable: ${describe(e)}`;
        return; // the last figures stay on screen
      }
      message.textContent = stats.message || "";
      figures.update(stats.replicas);
    },
  };
}
