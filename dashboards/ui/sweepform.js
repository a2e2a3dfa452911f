// The sweep launch form: built from the API's SweepCreate schema (/openapi.json), with an editor for
// the search space (spec field path -> dimension); the API's 422 messages appear at their fields.

import { api, ApiError, describe } from "./api.js";
import { el, replace } from "./dom.js";
import { SchemaForm, addError, leafPaths } from "./schemaform.js";

const SPACE = ["spec", "space"];
const BASE = ["spec", "base"];
// The first row of an empty search space: the dimension most sweeps start with.
const FIRST_DIMENSION = { path: "train.lr", type: "loguniform" };

// The search space: rows of (path, dimension), the dimension's fields from the schema's union.
function spaceEditor(form, schema, loc, label) {
  const s = form.resolve(schema);
  // Paths are the keys: pydantic writes their pattern as patternProperties.
  const dimension = s.additionalProperties || Object.values(s.patternProperties || {})[0];
  const listId = "space-paths";
  const rows = [];
  const list = el("div");
  const error = el("p", { class: "field-error" });
  const datalist = el("datalist", { id: listId });

  function addRow(path = "", type) {
    const pathInput = el("input", { type: "text", value: path, list: listId, placeholder: "e.g. train.lr",
                                    "data-loc": JSON.stringify([...loc, "path"]), "aria-label": "spec field path" });
    const inner = form.field(type ? { ...form.resolve(dimension), default: { type } } : dimension,
                             [...loc, "(new)"], "dimension", true);
    const rowError = el("p", { class: "field-error" });
    const row = { pathInput, inner, error: rowError };
    const remove = el("button", { type: "button", class: "secondary", onclick: () => {
      rows.splice(rows.indexOf(row), 1);
      row.node.remove();
    } }, "Remove");
    row.node = el("div", { class: "space-row" }, pathInput, el("div", {}, inner.node), rowError, remove);
    rows.push(row);
    list.append(row.node);
  }

  const field = {
    node: el("fieldset", { id: "space" }, el("legend", {}, label), error, datalist, list,
      el("button", { type: "button", class: "secondary", onclick: () => addRow() }, "Add dimension")),
    error,
    get: () => Object.fromEntries(rows.filter((r) => r.pathInput.value.trim())
      .map((r) => [r.pathInput.value.trim(), r.inner.get()])),
    // loc below the space: [path, ...inside the dimension]
    claim(below, msg) {
      const row = rows.find((r) => r.pathInput.value.trim() === below[0]);
      if (row) addError({ ...row, node: row.node }, below.slice(1).join("."), msg);
      else addError(field, below.join("."), msg);
    },
    clear() {
      for (const r of rows) r.error.textContent = "";
    },
    fillPaths(paths) {
      replace(datalist, paths.map((p) => el("option", { value: p })));
    },
  };
  for (const [path, dim] of Object.entries(s.default || {})) addRow(path, dim.type);
  if (!rows.length) addRow(FIRST_DIMENSION.path, FIRST_DIMENSION.type);
  return field;
}

function sweepSchema(doc) {
  const schemas = doc.components?.schemas || {};
  if (!schemas.SweepCreate) throw new Error("this service has no sweeps (no SweepCreate in its API)");
  return schemas;
}

export function sweepFormPage(root) {
  let built = false;
  return {
    live: false,
    async refresh() {
      if (built) return;
      const schemas = sweepSchema(await api("/openapi.json"));
      const form = new SchemaForm(schemas, schemas.SweepCreate, { custom: { [JSON.stringify(SPACE)]: spaceEditor } });
      const spaceField = form.fields.get(JSON.stringify(SPACE));
      const base = form.fields.get(JSON.stringify(BASE));
      const spec = form.resolve(schemas.SweepCreate.properties.spec);
      spaceField.fillPaths(leafPaths(form, spec.properties.base));
      // The base training spec is long: folded, its defaults apply unless changed.
      const fold = el("details", {}, el("summary", {}, "Base training spec (defaults unless changed)"));
      base.node.replaceWith(fold);
      fold.append(base.node);
      const top = el("p", { class: "error", role: "alert", id: "form-error" });
      const submit = el("button", { type: "submit" }, "Launch sweep");
      const node = el("form", { id: "sweep-form", class: "card", novalidate: true }, form.root.node, top, submit);
      node.addEventListener("submit", async (event) => {
        event.preventDefault();
        form.clearErrors();
        top.textContent = "";
        submit.disabled = true;
        try {
          const sweep = await api("/v1/sweeps", { method: "POST", body: form.value() });
          location.hash = `#/sweeps/${sweep.id}`;
        } catch (e) {
          if (e instanceof ApiError && e.status === 422 && Array.isArray(e.detail)) {
            top.textContent = form.showErrors(e.detail).join("\n") || "the spec has errors: see the marked fields";
          } else {
            top.textContent = describe(e);
          }
        } finally {
          submit.disabled = false;
        }
      });
      replace(root, el("h1", {}, "New sweep"), node);
      built = true;
    },
  };
}
