// DOM building without HTML strings: every piece of text (job names, errors, logs, parameters) goes
// in as a text node, so nothing a user or a job wrote is ever parsed as markup. There is no
// HTML parsing anywhere in the dashboard (no inner or outer HTML setters).

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, props, children) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = String(value);
    else if (key === "value" && "value" in node && !(node instanceof SVGElement)) node.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled") node[key] = Boolean(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// el("a", {href: "#/jobs", class: "x", onclick: fn}, "text", otherNode)
export function el(tag, props = {}, ...children) {
  return build(document.createElement(tag), props, children);
}

export function svg(tag, props = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), props, children);
}

export function replace(node, ...children) {
  node.replaceChildren();
  return build(node, {}, children);
}

export function badge(state) {
  return el("span", { class: `badge ${state}` }, state);
}

export function progressBar(done, total) {
  const span = el("span");
  const share = total > 0 ? Math.max(0, Math.min(1, done / total)) : 0;
  span.style.width = `${(share * 100).toFixed(1)}%`; // CSSOM, allowed by the policy (no style attribute)
  return el("div", { class: "bar", title: total ? `${done} / ${total}` : "" }, span);
}

export function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || x === "") return "";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toPrecision(digits).replace(/\.?0+$/, "");
}

export function fmtTime(epochS) {
  return epochS ? new Date(epochS * 1000).toLocaleString() : "";
}

export function fmtAge(epochS) {
  if (!epochS) return "";
  const s = Math.max(0, Date.now() / 1000 - epochS);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

export function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

export function errorBox(message) {
  return el("p", { class: "error", role: "alert" }, message);
}

// A table that keeps its sort, filter and rows' DOM across live refreshes. columns: [{key, label, value(row)
// -> sortable/filterable value, cell(row) -> Node|string (default: value), num: bool}].
export class LiveTable {
  constructor(columns, { onRowClick, rowId, empty = "nothing yet", filterLabel = "Filter" } = {}) {
    this.columns = columns;
    this.onRowClick = onRowClick;
    this.rowId = rowId;
    this.empty = empty;
    this.sortKey = null;
    this.sortDir = 1;
    this.rows = [];
    this.selected = null;
    this.shown = new Map(); // row id -> {tr, row}
    this.filter = el("input", { type: "text", placeholder: "text to match in any column", class: "filter",
                                oninput: () => this.render() });
    this.head = el("tr");
    this.body = el("tbody");
    this.count = el("span", { class: "muted" });
    this.node = el("div", {},
      el("div", { class: "row" }, el("label", { class: "inline" }, filterLabel, this.filter), this.count),
      el("table", {}, el("thead", {}, this.head), this.body));
    this.renderHead();
  }

  renderHead() {
    replace(this.head, this.columns.map((c) => {
      const sorted = c.key === this.sortKey ? (this.sortDir > 0 ? " sorted-asc" : " sorted-desc") : "";
      return el("th", { class: `sortable${c.num ? " num" : ""}${sorted}`, "data-key": c.key,
                        onclick: () => this.sortBy(c.key) }, c.label);
    }));
  }

  sortBy(key) {
    this.sortDir = this.sortKey === key ? -this.sortDir : 1;
    this.sortKey = key;
    this.renderHead();
    this.render();
  }

  update(rows) {
    this.rows = rows;
    this.render();
  }

  value(column, row) {
    return column.value ? column.value(row) : row[column.key];
  }

  // Rows are keyed by rowId: a row already shown keeps its <tr> (and every cell whose content is
  // unchanged keeps its nodes), so a refresh loses no focus, text selection or scroll position.
  render() {
    const needle = this.filter.value.trim().toLowerCase();
    let rows = this.rows;
    if (needle) {
      rows = rows.filter((r) => this.columns.some((c) => String(this.value(c, r) ?? "").toLowerCase().includes(needle)));
    }
    const column = this.columns.find((c) => c.key === this.sortKey);
    if (column) {
      rows = [...rows].sort((a, b) => compare(this.value(column, a), this.value(column, b)) * this.sortDir);
    }
    this.count.textContent = needle ? `${rows.length} of ${this.rows.length}` : `${this.rows.length}`;
    if (!rows.length) {
      this.shown.clear();
      replace(this.body, el("tr", {}, el("td", { colspan: this.columns.length, class: "muted" }, this.empty)));
      return;
    }
    const keep = new Set();
    rows.forEach((r, i) => {
      const id = this.rowId ? String(this.rowId(r)) : String(i);
      let entry = this.shown.get(id);
      if (!entry) {
        entry = { tr: el("tr", { "data-id": this.rowId ? id : undefined }), row: r };
        if (this.onRowClick) {
          entry.tr.classList.add("clickable");
          entry.tr.addEventListener("click", (e) => rowClick(e, () => this.onRowClick(entry.row)));
        }
        this.shown.set(id, entry);
      }
      entry.row = r;
      entry.tr.classList.toggle("selected", this.rowId !== undefined && this.rowId(r) === this.selected);
      this.fill(entry.tr, r);
      keep.add(entry.tr);
      const at = this.body.children[i];
      if (at !== entry.tr) this.body.insertBefore(entry.tr, at || null);
    });
    for (const [id, entry] of this.shown) if (!keep.has(entry.tr)) this.shown.delete(id);
    for (const child of [...this.body.children]) if (!keep.has(child)) child.remove();
  }

  // A row's cells, each replaced only when what it shows changed.
  fill(tr, r) {
    this.columns.forEach((c, j) => {
      const fresh = el("td", { class: c.num ? "num" : undefined }, c.cell ? c.cell(r) : fmtNum(this.value(c, r)));
      const old = tr.children[j];
      if (!old) tr.append(fresh);
      else if (!old.isEqualNode(fresh)) old.replaceChildren(...fresh.childNodes);
    });
  }
}

// Shows build()'s nodes in node only when key differs from the key shown last: a part of a page
// whose data did not change keeps its DOM (focus, selection, scroll, an open <details>).
const shownKeys = new WeakMap();
export function keyed(node, key, build) {
  if (shownKeys.get(node) === key) return;
  shownKeys.set(node, key);
  replace(node, build());
}

function rowClick(event, action) {
  // Buttons and links inside a row do their own thing.
  if (event.target.closest("button, a, input, select")) return;
  action();
}

// null/undefined last; numbers numerically; anything else as text.
function compare(a, b) {
  const na = a === null || a === undefined || a === "";
  const nb = b === null || b === undefined || b === "";
  if (na || nb) return na === nb ? 0 : na ? 1 : -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}
