// A form built from a JSON schema (the API's own, from /openapi.json), so the sweep launch form
// follows the SweepSpec model without a copy of its fields here. Each field knows its location
// (["spec", "space", "train.lr", "high"]), so a 422's `loc` lands at the field it names.
//
// Values the user leaves at the schema's default are left out of the body: the server applies its
// defaults, and the stored spec says only what was chosen.

import { el, replace } from "./dom.js";

let uid = 0;
const key = (loc) => JSON.stringify(loc);

export class SchemaForm {
  // components: the OpenAPI document's components.schemas (for $ref).
  constructor(components, schema, { loc = [], custom = {} } = {}) {
    this.components = components;
    this.custom = custom; // {locKey: (form, schema, loc) => field}: editors for special fields
    this.fields = new Map(); // locKey -> field (for errors)
    this.root = this.field(schema, loc, "", true);
  }

  resolve(schema) {
    let s = schema || {};
    while (s.$ref) s = this.components[s.$ref.split("/").pop()];
    if (s.allOf && s.allOf.length === 1) s = { ...this.resolve(s.allOf[0]), ...s, allOf: undefined };
    return s;
  }

  // Returns {node, get() -> value | undefined (leave out), errorAt(node)}.
  field(schema, loc, label, required) {
    const custom = this.custom[key(loc)];
    let f;
    if (custom) f = custom(this, schema, loc, label);
    else f = this.plain(schema, loc, label, required);
    this.fields.set(key(loc), f);
    return f;
  }

  plain(raw, loc, label, required) {
    const schema = this.resolve(raw);
    const variants = schema.anyOf || schema.oneOf;
    if (variants) {
      const nonNull = variants.map((v) => this.resolve(v)).filter((v) => v.type !== "null");
      const nullable = nonNull.length < variants.length;
      const doc = { ...schema, ...(nonNull.length === 1 ? nonNull[0] : {}), default: schema.default,
                    anyOf: undefined, oneOf: undefined };
      if (nonNull.length === 1) return this.plain(doc, loc, label, required && !nullable);
      if (nonNull.every((v) => v.const !== undefined || v.enum)) {
        return this.input({ ...schema, enum: nonNull.flatMap((v) => v.enum || [v.const]) }, loc, label, required);
      }
      if (nonNull.every((v) => v.type === "object")) return this.variants(schema, nonNull, loc, label);
      return this.input({ ...doc, type: nonNull.map((v) => v.type).find(Boolean) || "string" }, loc, label, required);
    }
    if (schema.const !== undefined) return { node: el("span"), error: el("span"), get: () => undefined };
    if (schema.type === "object" && schema.properties) return this.object(schema, loc, label, required);
    return this.input(schema, loc, label, required);
  }

  object(schema, loc, label, required = false) {
    const need = new Set(schema.required || []);
    const children = Object.entries(schema.properties).map(([name, sub]) => [
      name, this.field(sub, [...loc, name], this.resolve(sub).title || name, need.has(name))]);
    const box = loc.length ? el("fieldset", {}, el("legend", {}, label)) : el("div");
    const error = el("p", { class: "field-error" });
    box.append(error, ...children.map(([, f]) => f.node));
    return {
      node: box,
      error,
      get: () => {
        const out = {};
        for (const [name, f] of children) {
          const v = f.get();
          if (v !== undefined) out[name] = v;
        }
        return Object.keys(out).length || need.size || required ? out : undefined;
      },
    };
  }

  // A union of object shapes told apart by a "type" (or other discriminator) field: a select of the
  // shapes, and the chosen shape's fields.
  variants(schema, shapes, loc, label) {
    const tag = schema.discriminator?.propertyName || "type";
    const names = shapes.map((s) => s.properties?.[tag]?.const ?? s.properties?.[tag]?.enum?.[0] ?? s.title);
    const current = schema.default?.[tag] ?? names[0];
    const select = el("select", { "data-loc": key([...loc, tag]) },
      names.map((n) => el("option", { value: n, selected: n === current }, n)));
    const holder = el("div");
    const error = el("p", { class: "field-error" });
    let inner = null;
    const show = () => {
      const shape = shapes[names.indexOf(select.value)];
      const props = { ...shape.properties };
      delete props[tag];
      inner = this.object({ ...shape, properties: props, required: (shape.required || []).filter((r) => r !== tag) },
                          loc, "");
      replace(holder, ...inner.node.childNodes);
      this.fields.set(key(loc), field);
    };
    select.addEventListener("change", show);
    const field = {
      node: el("fieldset", {}, el("legend", {}, label), error,
                el("label", { class: "inline" }, tag, select), holder),
      error,
      get: () => ({ [tag]: select.value, ...(inner.get() || {}) }),
    };
    show();
    return field;
  }

  input(schema, loc, label, required) {
    const id = `f${++uid}`;
    const hint = [];
    let control;
    const dflt = schema.default;
    if (schema.enum) {
      control = el("select", { id }, required || dflt !== undefined ? null : el("option", { value: "" }, ""),
        schema.enum.map((v) => el("option", { value: JSON.stringify(v), selected: v === dflt }, String(v))));
    } else if (schema.type === "boolean") {
      control = el("input", { id, type: "checkbox", checked: dflt === true });
    } else if (schema.type === "array") {
      control = el("input", { id, type: "text", value: Array.isArray(dflt) ? dflt.join(", ") : "" });
      hint.push("comma-separated");
    } else {
      const numeric = schema.type === "integer" || schema.type === "number";
      control = el("input", { id, type: numeric ? "number" : "text", value: dflt ?? "",
                              step: schema.type === "integer" ? "1" : numeric ? "any" : undefined,
                              min: schema.minimum, max: schema.maximum });
      for (const [k, word] of [["minimum", ">="], ["exclusiveMinimum", ">"], ["maximum", "<="], ["exclusiveMaximum", "<"]]) {
        if (schema[k] !== undefined) hint.push(`${word} ${schema[k]}`);
      }
      if (schema.pattern) hint.push(`pattern ${schema.pattern}`);
    }
    control.dataset.loc = key(loc);
    const error = el("p", { class: "field-error" });
    const initial = readControl(control, schema);
    const node = el("label", { for: id }, label || loc.at(-1), required ? " *" : "", control,
      schema.description || hint.length ? el("span", { class: "hint" }, [schema.description, ...hint].filter(Boolean).join("; ")) : null,
      error);
    return {
      node, error, control,
      get: () => {
        const v = readControl(control, schema);
        return !required && JSON.stringify(v) === JSON.stringify(initial) ? undefined : v;
      },
    };
  }

  value() {
    return this.root.get() ?? {};
  }

  clearErrors() {
    for (const f of this.fields.values()) {
      f.error.textContent = "";
      f.control?.classList.remove("invalid");
      f.clear?.();
    }
  }

  // Puts each 422 item at the deepest field its loc reaches (opening folded sections); returns the
  // messages no field took.
  showErrors(detail) {
    const rest = [];
    for (const item of detail) {
      const loc = (item.loc || []).filter((p, i) => !(i === 0 && p === "body"));
      let f = null;
      let depth = loc.length;
      for (; depth >= 0 && !f; depth--) f = this.fields.get(key(loc.slice(0, depth))) || null;
      if (!f || f === this.root) {
        rest.push(`${loc.join(".")}: ${item.msg}`);
        continue;
      }
      const below = loc.slice(depth + 1);
      if (f.claim) {
        f.claim(below, item.msg); // an editor whose locations are its own (the search space's paths)
        continue;
      }
      addError(f, below.join("."), item.msg);
    }
    return rest;
  }
}

export function addError(field, where, msg) {
  field.error.textContent += `${field.error.textContent ? "\n" : ""}${where ? `${where}: ` : ""}${msg}`;
  field.control?.classList.add("invalid");
  for (let d = field.node.closest("details"); d; d = d.parentElement?.closest("details")) d.open = true;
}

// The control's value as the schema's type; undefined when empty (the server's default applies).
export function readControl(control, schema) {
  if (control.type === "checkbox") return control.checked;
  const raw = control.value.trim();
  if (raw === "") return undefined;
  if (control.tagName === "SELECT") return JSON.parse(raw);
  if (schema.type === "array") return raw.split(",").map((s) => parseScalar(s.trim()));
  if (schema.type === "integer" || schema.type === "number") return Number(raw);
  return raw;
}

// "0.1" -> 0.1, "true" -> true, "adamw" -> "adamw": a choice's values may be of any JSON type.
export function parseScalar(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

// Leaf paths of a schema ("train.lr", "model.n_routed_experts", ...) whose values are numbers, enums
// or booleans: the suggestions of a search-space path.
export function leafPaths(form, schema, prefix = "") {
  const s = form.resolve(schema);
  if (s.type === "object" && s.properties) {
    return Object.entries(s.properties).flatMap(([k, v]) => leafPaths(form, v, prefix ? `${prefix}.${k}` : k));
  }
  const variants = (s.anyOf || []).map((v) => form.resolve(v)).filter((v) => v.type !== "null");
  const leaf = variants.length === 1 ? variants[0] : s;
  return ["integer", "number", "boolean"].includes(leaf.type) || leaf.enum ? [prefix] : [];
}
