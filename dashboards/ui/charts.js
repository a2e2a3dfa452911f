// Charts drawn as SVG by the page: line (overlaid curves with marks), scatter, parallel coordinates.
// Why not a charting library: the sweep page needs parallel coordinates (the small offline libraries
// such as uPlot have none), and SVG keeps every drawn series in the DOM, where the browser tests
// can count its points. Colours come from CSS classes s0..s9 / f0..f9 (style.css), never from
// inline styles, so the Content-Security-Policy needs no 'unsafe-inline'. Labels are text nodes.

import { el, fmtNum, svg } from "./dom.js";

const W = 640;
const H = 300;
const PAD = { left: 56, right: 16, top: 14, bottom: 38 };
export const COLOURS = 10;
const AXIS_LABEL_ROOM = 40; // right of the last parallel axis, for its tick labels

// A linear (or log10) scale from the data's extent onto [r0, r1], with ~5 round ticks.
function scale(values, r0, r1, log = false) {
  const finite = values.filter((v) => Number.isFinite(v) && (!log || v > 0));
  const t = (v) => (log ? Math.log10(v) : v);
  let lo = finite.length ? Math.min(...finite.map(t)) : 0;
  let hi = finite.length ? Math.max(...finite.map(t)) : 1;
  if (lo === hi) {
    lo -= 0.5;
    hi += 0.5;
  }
  const f = (v) => r0 + ((t(v) - lo) / (hi - lo)) * (r1 - r0);
  const ticks = [];
  if (log) {
    for (let p = Math.ceil(lo); p <= Math.floor(hi); p++) ticks.push(10 ** p);
    if (ticks.length < 2) ticks.splice(0, ticks.length, 10 ** lo, 10 ** hi);
  } else {
    const raw = (hi - lo) / 5;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  }
  return { f, ticks };
}

function frame(title) {
  return svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title },
    svg("title", {}, title));
}

function axes(root, xs, ys, xLabel, yLabel) {
  const grid = svg("g", { class: "grid" });
  const axis = svg("g", { class: "axis" });
  for (const v of ys.ticks) {
    const y = ys.f(v);
    grid.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y }));
    axis.append(svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, fmtNum(v, 3)));
  }
  for (const v of xs.ticks) {
    const x = xs.f(v);
    axis.append(svg("line", { x1: x, x2: x, y1: H - PAD.bottom, y2: H - PAD.bottom + 4 }));
    axis.append(svg("text", { x, y: H - PAD.bottom + 16, "text-anchor": "middle" }, fmtNum(v, 3)));
  }
  axis.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }));
  axis.append(svg("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom }));
  axis.append(svg("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  axis.append(svg("text", { x: 12, y: PAD.top + (H - PAD.top - PAD.bottom) / 2, "text-anchor": "middle",
                            transform: `rotate(-90 12 ${PAD.top + (H - PAD.top - PAD.bottom) / 2})` }, yLabel));
  root.append(grid, axis);
}

function emptyNote(root, text) {
  root.append(svg("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, text));
}

// series: [{name, colour (0..9), points: [[x, y]], dim, hot, marks: [[x, y]] (drawn as an x: a trial
// the scheduler stopped early)}]. Points with a null y are gaps.
export function lineChart({ title, series, xLabel = "step", yLabel = "loss", logY = false, empty = "no points yet" }) {
  const root = frame(title);
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (!all.length) {
    emptyNote(root, empty);
    return root;
  }
  const xs = scale(all.map((p) => p[0]), PAD.left, W - PAD.right);
  const ys = scale(all.map((p) => p[1]), H - PAD.bottom, PAD.top, logY);
  axes(root, xs, ys, xLabel, yLabel);
  // Dimmed series first, the highlighted one last (on top).
  const ordered = [...series].sort((a, b) => Number(Boolean(a.hot)) - Number(Boolean(b.hot)));
  for (const s of ordered) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]) && (!logY || p[1] > 0));
    const d = pts.map((p, i) => `${i ? "L" : "M"}${xs.f(p[0]).toFixed(1)},${ys.f(p[1]).toFixed(1)}`).join("");
    const cls = `series s${s.colour % COLOURS}${s.hot ? " hot" : ""}${s.dim ? " dim" : ""}`;
    const g = svg("g", { "data-series": s.name, "data-points": pts.length }, svg("title", {}, s.name));
    if (pts.length === 1) {
      g.append(svg("circle", { class: `dot f${s.colour % COLOURS}`, cx: xs.f(pts[0][0]), cy: ys.f(pts[0][1]), r: 3 }));
    } else if (pts.length) {
      g.append(svg("path", { class: cls, d }));
    }
    for (const [x, y] of s.marks || []) {
      const cx = xs.f(x);
      const cy = ys.f(y);
      g.append(svg("path", { class: `stop-mark s${s.colour % COLOURS}`, "data-mark": "early-stopped",
                             d: `M${cx - 5},${cy - 5}L${cx + 5},${cy + 5}M${cx - 5},${cy + 5}L${cx + 5},${cy - 5}` }));
    }
    root.append(g);
  }
  return root;
}

// points: [{x, y, colour, label}]
export function scatterChart({ title, points, xLabel, yLabel, logX = false, empty = "no finished points yet" }) {
  const root = frame(title);
  const ok = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y) && (!logX || p.x > 0));
  if (!ok.length) {
    emptyNote(root, empty);
    return root;
  }
  const xs = scale(ok.map((p) => p.x), PAD.left + 8, W - PAD.right - 8, logX);
  const ys = scale(ok.map((p) => p.y), H - PAD.bottom - 8, PAD.top + 8);
  axes(root, xs, ys, xLabel, yLabel);
  for (const p of ok) {
    root.append(svg("circle", { class: `dot f${p.colour % COLOURS}`, cx: xs.f(p.x), cy: ys.f(p.y), r: 5,
                                "data-label": p.label },
      svg("title", {}, `${p.label}: ${xLabel} = ${fmtNum(p.x)}, ${yLabel} = ${fmtNum(p.y)}`)));
  }
  return root;
}

// axes: [{name, log}] ; lines: [{values: [number|string|null per axis], colour, label, dim}]
// A text axis (a choice of strings) spreads its distinct values evenly.
export function parallelCoordinates({ title, axes: dims, lines, empty = "no trials yet" }) {
  const root = frame(title);
  if (!lines.length || dims.length < 2) {
    emptyNote(root, lines.length ? "needs two axes or more" : empty);
    return root;
  }
  const left = PAD.left;
  const step = (W - PAD.left - PAD.right - AXIS_LABEL_ROOM) / (dims.length - 1);
  const scales = dims.map((dim, i) => {
    const column = lines.map((l) => l.values[i]);
    if (column.some((v) => typeof v === "string")) {
      const cats = [...new Set(column.filter((v) => v !== null && v !== undefined).map(String))].sort();
      const pos = (v) => H - PAD.bottom - ((cats.indexOf(String(v)) + 0.5) / cats.length) * (H - PAD.top - PAD.bottom);
      return { f: pos, ticks: cats, text: true };
    }
    return scale(column.map(Number), H - PAD.bottom, PAD.top, dim.log);
  });
  const g = svg("g", { class: "axis" });
  dims.forEach((dim, i) => {
    const x = left + i * step;
    g.append(svg("line", { x1: x, x2: x, y1: PAD.top, y2: H - PAD.bottom }));
    g.append(svg("text", { x, y: H - PAD.bottom + 16, "text-anchor": "middle" }, dim.name));
    for (const t of scales[i].ticks) {
      g.append(svg("text", { x: x + 4, y: scales[i].f(t) + 4 }, scales[i].text ? t : fmtNum(t, 3)));
    }
  });
  root.append(g);
  for (const line of lines) {
    const pts = line.values.map((v, i) => (v === null || v === undefined ? null : [left + i * step, scales[i].f(v)]));
    if (pts.some((p) => p === null || !Number.isFinite(p[1]))) continue; // a trial without a metric yet
    const d = pts.map((p, i) => `${i ? "L" : "M"}${p[0].toFixed(1)},${p[1].toFixed(1)}`).join("");
    root.append(svg("path", { class: `series s${line.colour % COLOURS}${line.dim ? " dim" : ""}`, d,
                              "data-series": line.label }, svg("title", {}, line.label)));
  }
  return root;
}

export function legend(items) {
  return el("div", { class: "legend" },
    items.map((it) => el("span", {}, el("span", { class: `swatch b${it.colour % COLOURS}` }), it.label)));
}
