// The API's own vocabulary, read once from its OpenAPI document (/openapi.json, with the token):
// the values of its enums (job, trial and deployment states) come from there, never from literals
// in the page, so a state the service adds shows up in the filters without a change here.

import { api } from "./api.js";

let loaded = null;

function schemas() {
  loaded ??= api("/openapi.json").then((doc) => doc.components?.schemas || {}).catch((e) => {
    loaded = null; // try again on the next refresh
    throw e;
  });
  return loaded;
}

// The values of the named enum schema ("JobState", "TrialState", "DeploymentStatus").
export async function enumValues(name) {
  const values = (await schemas())[name]?.enum;
  if (!Array.isArray(values)) throw new Error(`the API's schema has no enum ${name}`);
  return values;
}

// The enum's values a record never leaves: the schema's "x-terminal" list (orchestrator/states.py,
// jobs/contracts/sweep_events.py publish it), a subset of the enum.
export async function terminalValues(name) {
  const listed = ((await schemas())[name] || {})["x-terminal"];
  if (!Array.isArray(listed)) throw new Error(`the API's schema lists no terminal values for ${name}`);
  const values = await enumValues(name);
  return new Set(values.filter((v) => listed.includes(v)));
}
