// Cluster: pools (capacity, use, free, queue) and nodes from /v1/cluster, and the queue of jobs.

import { api } from "./api.js";
import { LiveTable, badge, el, fmtNum, keyed, kv, progressBar, replace } from "./dom.js";

// The resource that sizes a pool of each device: its accelerator, or its CPUs.
const MAIN_RESOURCE = { gpu: "GPU", npu: "NPU", cpu: "CPU" };
const QUEUE_LIMIT = 200;

function resources(map) {
  return Object.entries(map || {})
    .filter(([k]) => k !== "memory" && k !== "object_store_memory")
    .map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ");
}

function utilisation(pool) {
  const key = MAIN_RESOURCE[pool.device] || "CPU";
  const cap = pool.capacity?.[key] || 0;
  const used = pool.in_use?.[key] || 0;
  return { key, cap, used, share: cap ? used / cap : null };
}

export function clusterPage(root) {
  const summary = el("div");
  const pools = new LiveTable([
    { key: "name", label: "Pool" },
    { key: "device", label: "Device" },
    { key: "nodes", label: "Nodes", num: true },
    { key: "util", label: "Utilisation", value: (p) => utilisation(p).share,
      cell: (p) => { const u = utilisation(p); return el("div", { class: "row" }, progressBar(u.used, u.cap),
                                                        `${fmtNum(u.used)} / ${fmtNum(u.cap)} ${u.key}`); } },
    { key: "capacity", label: "Capacity", value: (p) => resources(p.capacity) },
    { key: "in_use", label: "In use", value: (p) => resources(p.in_use) },
    { key: "free", label: "Free", value: (p) => resources(p.free) },
    { key: "max", label: "Autoscaler max", value: (p) => resources(p.max_capacity) },
    { key: "queued_jobs", label: "Queued jobs", num: true },
    { key: "queued", label: "Queued demand", value: (p) => resources(p.queued_demand) },
  ], { empty: "no pools (no alive nodes)", rowId: (p) => p.name });
  const queue = new LiveTable([
    { key: "queue_position", label: "#", num: true },
    { key: "name", label: "Job", cell: (j) => el("a", { href: `#/jobs/${j.id}` }, j.name) },
    { key: "kind", label: "Kind" },
    { key: "priority", label: "Priority" },
    { key: "team", label: "Team" },
    { key: "queue_reason", label: "Waiting for" },
  ], { empty: "no queued jobs", rowId: (j) => j.id });
  const nodes = new LiveTable([
    { key: "node_id", label: "Node" },
    { key: "ip", label: "IP" },
    { key: "device", label: "Device" },
    { key: "state", label: "State", cell: (n) => badge(n.state) },
    { key: "is_head", label: "Head", value: (n) => (n.is_head ? "head" : "") },
    { key: "resources", label: "Resources", value: (n) => resources(n.resources) },
  ], { rowId: (n) => n.node_id });
  replace(root, el("h1", {}, "Cluster"), summary,
    el("section", { id: "pools" }, el("h2", {}, "Pools"), pools.node),
    el("section", { id: "queue" }, el("h2", {}, "Queue"), queue.node),
    el("section", { id: "nodes" }, el("h2", {}, "Nodes"), nodes.node));
  return {
    async refresh() {
      const [cluster, queued] = await Promise.all([
        api("/v1/cluster"), api(`/v1/jobs?state=QUEUED&limit=${QUEUE_LIMIT}`)]);
      const pairs = [["Ray", cluster.ray_address || "(none configured)"], ["alive nodes", cluster.alive_nodes],
        ["resources", resources(cluster.totals)], ["unmanaged Ray jobs", cluster.unmanaged_jobs ?? 0]];
      keyed(summary, JSON.stringify(pairs), () => el("div", { class: "card" }, kv(pairs)));
      pools.update(Object.entries(cluster.pools || {}).map(([name, p]) => ({ name, ...p })));
      queue.update(queued.data);
      nodes.update(cluster.nodes);
    },
  };
}
