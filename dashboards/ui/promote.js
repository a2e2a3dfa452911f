// Promote: serve a finished sweep's best trial (POST /v1/sweeps/{id}/promote). The service stores the
// deployment and answers its bearer key once (it keeps only the key's SHA-256), so the key is shown
// here once: it stays on screen until the page is left, through the sweep's live refreshes and any
// later failed promote, and nothing can fetch it again.

import { api, describe } from "./api.js";
import { el, fmtNum, kv, replace } from "./dom.js";

const NAME_MAX_CHARS = 64; // the API's limit on a deployment name (orchestrator/api/schemas/base.py: Name)

// Why the best trial cannot be promoted now, or null: the route's own checks (a finished sweep whose
// best trial has a checkpoint), said before a click instead of after it.
function promoteBlocker(sweep, terminal) {
  if (!terminal.has(sweep.state)) {
    return `the sweep is ${sweep.state}: its best trial may still change; promote it once it has finished`;
  }
  if (!sweep.best) return `no trial has reported ${sweep.metric}`;
  if (!sweep.best.checkpoint) return `the best trial (${sweep.best.trial_id}) has no checkpoint`;
  return null;
}

function created(d) {
  return el("div", { id: "promoted" },
    kv([["deployment", d.name], ["id", d.id], ["status", d.status], ["serves", d.source],
        ["checkpoint", d.checkpoint], ["OpenAI base URL", d.base_url]]),
    el("p", {}, "API key: ", el("code", { id: "promoted-key", class: "secret" }, d.api_key)),
    el("p", { class: "hint" }, "Copy the key now: it will not be shown again (the service keeps only its hash)."));
}

// The panel (created once per sweep page, so what it shows outlives refreshes) and update(sweep).
export function promotePanel(sweepId) {
  let blocker = "loading";
  let busy = false;
  const name = el("input", { type: "text", id: "promote-name", maxlength: NAME_MAX_CHARS, autocomplete: "off",
                             spellcheck: "false", placeholder: "default: its id" });
  const button = el("button", { type: "submit", id: "promote", disabled: true }, "Promote best trial");
  const why = el("span", { class: "hint", id: "promote-why" });
  const error = el("p", { class: "error", id: "promote-error", role: "alert" });
  const result = el("div");

  async function promote(event) {
    event.preventDefault();
    if (blocker !== null || busy) return;
    busy = true;
    button.disabled = true;
    error.textContent = "";
    const given = name.value.trim();
    try {
      replace(result, created(await api(`/v1/sweeps/${sweepId}/promote`, { method: "POST",
                                                                            body: given ? { name: given } : {} })));
    } catch (err) {
      error.textContent = describe(err); // the API's message (a 422 names the field), as text
    } finally {
      busy = false;
      button.disabled = blocker !== null;
    }
  }

  return {
    node: el("section", { class: "card", id: "promote-card" }, el("h2", {}, "Serve the best trial"),
      el("form", { class: "row", onsubmit: promote },
        el("label", { class: "inline" }, "deployment name", name), button, why),
      error, result),
    // terminal: the sweep states it never leaves (from the API's schema).
    update(sweep, terminal) {
      blocker = promoteBlocker(sweep, terminal);
      button.disabled = busy || blocker !== null;
      button.title = blocker ?? `serve trial ${sweep.best.trial_id}'s checkpoint on Ray Serve`;
      why.textContent = blocker ?? `trial ${sweep.best.trial_id}: ${sweep.metric} ${fmtNum(sweep.best.value)}`;
    },
  };
}
