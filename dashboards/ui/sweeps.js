// Sweeps: the list, and one sweep live: trial table (sortable, filterable, stop buttons), overlaid
// learning curves with early-stopped trials marked, a parameter-vs-metric scatter, parallel
// coordinates, the best value so far, and the best trial promoted to a deployment (promote.js).

import { api, describe } from "./api.js";
import { COLOURS, legend, lineChart, parallelCoordinates, scatterChart } from "./charts.js";
import { LiveTable, badge, el, fmtAge, fmtNum, keyed, kv, progressBar, replace } from "./dom.js";
import { promotePanel } from "./promote.js";
import { terminalValues } from "./schema.js";

const LIST_LIMIT = 200;
let TERMINAL_TRIAL = new Set(); // from the API's schema (TrialState, JobState) on the first refresh
let TERMINAL_JOB = new Set();

export function sweepsPage(root) {
  const table = new LiveTable([
    { key: "name", label: "Name", cell: (s) => el("a", { href: `#/sweeps/${s.id}` }, s.name) },
    { key: "id", label: "Id" },
    { key: "state", label: "State", cell: (s) => badge(s.state) },
    { key: "trials", label: "Trials", value: (s) => Object.entries(s.counts || {}).map(([k, n]) => `${n} ${k}`).join(", ") },
    { key: "metric", label: "Metric", value: (s) => `${s.metric} (${s.mode})` },
    { key: "best", label: "Best", num: true, value: (s) => s.best?.value ?? null },
    { key: "team", label: "Team" },
    { key: "created_at", label: "Created", value: (s) => s.created_at, cell: (s) => fmtAge(s.created_at) },
  ], { onRowClick: (s) => { location.hash = `#/sweeps/${s.id}`; }, rowId: (s) => s.id, empty: "no sweeps" });
  replace(root, el("div", { class: "row" }, el("h1", {}, "Sweeps"),
                   el("a", { href: "#/sweeps/new", id: "new-sweep" }, "New sweep")), table.node);
  return {
    async refresh() {
      table.update((await api(`/v1/sweeps?limit=${LIST_LIMIT}`)).data);
    },
  };
}

const better = (mode) => (a, b) => (mode === "max" ? a > b : a < b);

// Running best of the trials' best values, in the order the trials started.
export function bestSoFar(trials, mode) {
  const points = [];
  let best = null;
  trials.forEach((t, i) => {
    if (typeof t.best_metric !== "number") return;
    if (best === null || better(mode)(t.best_metric, best)) best = t.best_metric;
    points.push([i + 1, best]);
  });
  return points;
}

// A trial's actions (stop, while it and the sweep run), given the sweep and what to redraw.
function trialActions(sweep, trial, onDone) {
  if (TERMINAL_TRIAL.has(trial.state) || TERMINAL_JOB.has(sweep.state)) return [];
  if (trial.stop_requested) return [el("span", { class: "muted" }, "stop requested")];
  return [el("button", { type: "button", class: "danger", "data-stop": trial.id, onclick: async (e) => {
    e.target.disabled = true;
    try {
      await api(`/v1/sweeps/${sweep.id}/trials/${trial.id}/stop`, { method: "POST" });
    } catch (err) {
      e.target.replaceWith(el("span", { class: "error" }, describe(err)));
      return;
    }
    onDone();
  } }, "Stop")];
}

export function sweepDetailPage(root, id) {
  let sweep = null;
  let selected = null; // trial id whose curve is highlighted
  let scatterParam = null;
  const head = el("div");
  const promote = promotePanel(id);
  const tableHolder = el("div");
  const curves = el("div", { id: "curves" });
  const trialPanel = el("div", { id: "trial-detail" });
  const scatter = el("div", { id: "scatter" });
  const parallel = el("div", { id: "parallel" });
  const best = el("div", { id: "best-so-far" });
  const paramSelect = el("select", { id: "scatter-param", onchange: () => { scatterParam = paramSelect.value; draw(); } });
  let table = null;
  let columnsKey = "";
  const colour = new Map(); // trial id -> colour index, stable across refreshes

  replace(root, head, promote.node,
    el("section", { class: "card" }, el("h2", {}, "Trials"), tableHolder),
    el("div", { class: "grid" },
      el("section", { class: "card" }, el("h2", {}, "Learning curves"), curves),
      el("section", { class: "card" }, el("h2", {}, "Selected trial"), trialPanel)),
    el("div", { class: "grid" },
      el("section", { class: "card" }, el("h2", {}, "Parameter vs metric"),
         el("label", { class: "inline" }, "parameter", paramSelect), scatter),
      el("section", { class: "card" }, el("h2", {}, "Parallel coordinates"), parallel)),
    el("section", { class: "card" }, el("h2", {}, "Best so far"), best));

  function select(trial) {
    selected = selected === trial.id ? null : trial.id;
    table.selected = selected;
    table.render();
    draw();
  }

  function makeTable(params) {
    table = new LiveTable([
      { key: "id", label: "Trial" },
      { key: "state", label: "State", cell: (t) => badge(t.state) },
      ...params.map((p) => ({ key: `p:${p}`, label: p, num: true, value: (t) => t.parameters?.[p] ?? null })),
      { key: "step", label: "Step", value: (t) => t.step,
        cell: (t) => el("div", { class: "row" }, progressBar(t.step || 0, t.total_steps || 0), `${t.step ?? 0}/${t.total_steps ?? "?"}`) },
      { key: "last_metric", label: `last ${sweep.metric}`, num: true },
      { key: "best_metric", label: `best ${sweep.metric}`, num: true },
      { key: "compression", label: "dense / sent", num: true },
      { key: "error", label: "Error", value: (t) => t.error || "" },
      { key: "actions", label: "", value: () => "", cell: (t) => el("span", {}, trialActions(sweep, t, refresh)) },
    ], { onRowClick: select, rowId: (t) => t.id, empty: "no trials yet", filterLabel: "Filter trials" });
    table.selected = selected;
    replace(tableHolder, table.node);
  }

  function draw() {
    const trials = sweep.trials;
    const params = Object.keys(sweep.spec?.space || {});
    trials.forEach((t) => { if (!colour.has(t.id)) colour.set(t.id, colour.size % COLOURS); });
    replace(curves, lineChart({
      title: `${sweep.name}: learning curves`, yLabel: "loss",
      series: trials.map((t) => {
        const pts = (t.history || []).map((p) => [p.step, p.loss]);
        return { name: t.id, colour: colour.get(t.id), points: pts, hot: t.id === selected,
                 dim: selected !== null && t.id !== selected,
                 marks: t.state === "EARLY_STOPPED" && pts.length ? [pts.at(-1)] : [] };
      }),
    }), legend(trials.map((t) => ({ colour: colour.get(t.id), label: `${t.id}${t.state === "EARLY_STOPPED" ? " (early-stopped, x)" : ""}` }))));
    const chosen = trials.find((t) => t.id === selected);
    replace(trialPanel, chosen ? [
      kv([["trial", chosen.id], ["state", badge(chosen.state)], ...Object.entries(chosen.parameters || {}).map(([k, v]) => [k, fmtNum(v)]),
          [`best ${sweep.metric}`, fmtNum(chosen.best_metric)], ["eval loss", fmtNum(chosen.eval_loss)],
          ["dense / sent", fmtNum(chosen.compression)],
          ["checkpoint", chosen.checkpoint], ["error", chosen.error]]),
      lineChart({ title: `trial ${chosen.id}`, series: [{ name: chosen.id, colour: colour.get(chosen.id),
        points: (chosen.history || []).map((p) => [p.step, p.loss]) }] }),
    ] : el("p", { class: "muted" }, "click a trial's row to open its curve"));
    if (!scatterParam || !params.includes(scatterParam)) scatterParam = params[0] ?? null;
    keyed(paramSelect, JSON.stringify(params), () => params.map((p) => el("option", { value: p }, p)));
    if (scatterParam !== null && paramSelect.value !== scatterParam) paramSelect.value = scatterParam;
    const dim = sweep.spec?.space?.[scatterParam] || {};
    replace(scatter, scatterChart({
      title: `${scatterParam} vs best ${sweep.metric}`, xLabel: scatterParam || "", yLabel: `best ${sweep.metric}`,
      logX: dim.type === "loguniform",
      points: trials.map((t) => ({ x: t.parameters?.[scatterParam], y: t.best_metric, colour: colour.get(t.id), label: t.id })),
    }));
    replace(parallel, parallelCoordinates({
      title: "parameters and metric",
      axes: [...params.map((p) => ({ name: p, log: sweep.spec.space[p].type === "loguniform" })), { name: `best ${sweep.metric}` }],
      lines: trials.map((t) => ({ label: t.id, colour: colour.get(t.id), dim: selected !== null && t.id !== selected,
                                  values: [...params.map((p) => t.parameters?.[p] ?? null), t.best_metric] })),
    }));
    replace(best, lineChart({ title: "best so far", xLabel: "trials (in start order)", yLabel: `best ${sweep.metric}`,
      series: [{ name: "best so far", colour: 0, points: bestSoFar(trials, sweep.mode) }], empty: "no trial has reported yet" }));
  }

  let drawn = null; // what the charts show: redrawn only when it changed

  async function refresh() {
    [sweep, TERMINAL_TRIAL, TERMINAL_JOB] = await Promise.all([api(`/v1/sweeps/${id}`), terminalValues("TrialState"),
                                                               terminalValues("JobState")]);
    const params = Object.keys(sweep.spec?.space || {});
    const cancel = el("button", { type: "button", class: "danger", id: "cancel-sweep", disabled: sweep.cancel_requested,
      onclick: async (e) => { e.target.disabled = true; await api(`/v1/sweeps/${id}/cancel`, { method: "POST" }); refresh(); } },
      sweep.cancel_requested ? "Cancelling" : "Stop sweep");
    keyed(head, JSON.stringify([sweep.state, sweep.counts, sweep.best, sweep.message, sweep.cancel_requested]), () => [
      el("h1", {}, el("span", { id: "sweep-name" }, sweep.name), " ", badge(sweep.state)),
      el("div", { class: "card" }, kv([
        ["id", sweep.id], ["metric", `${sweep.metric} (${sweep.mode})`], ["search", `${sweep.search}, scheduler ${sweep.scheduler}`],
        ["trials", Object.entries(sweep.counts || {}).map(([k, n]) => `${n} ${k}`).join(", ") || "none yet"],
        ["best", sweep.best ? `${fmtNum(sweep.best.value)} (trial ${sweep.best.trial_id}, step ${sweep.best.step})` : ""],
        ["message", sweep.message], ["team", `${sweep.team} (${sweep.owner})`]]),
        TERMINAL_JOB.has(sweep.state) ? null : el("p", {}, cancel))]);
    promote.update(sweep, TERMINAL_JOB);
    if (!table || columnsKey !== params.join("\n")) {
      columnsKey = params.join("\n");
      makeTable(params);
    }
    table.update(sweep.trials);
    const now = JSON.stringify([sweep.trials, sweep.state]);
    if (now !== drawn) draw();
    drawn = now;
  }

  return { refresh };
}
