// The one way the page talks to the service: the /v1 routes with the bearer token, as any client.
// The token lives in this module's memory only: never in a URL, a cookie or localStorage, so a reload
// (or a closed tab) signs out and no other page or script of this origin can read it back.

let token = null;
const listeners = new Set();

export class ApiError extends Error {
  // status: the HTTP status (0 when the service did not answer); detail: the body's "detail"
  // (a string, or FastAPI's list of {loc, msg, type} for a 422).
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

export function signedIn() {
  return token !== null;
}

export function onSignOut(listener) {
  listeners.add(listener);
}

export function signOut() {
  token = null;
  for (const listener of listeners) listener();
}

// Checks the token with a cheap authenticated read before keeping it; throws ApiError on refusal.
export async function signIn(candidate) {
  const given = candidate.trim();
  const r = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${given}` }, cache: "no-store" });
  if (!r.ok) throw new ApiError(r.status, r.status === 401 ? "invalid token" : `HTTP ${r.status}`);
  token = given;
}

// JSON from a /v1 route (or /openapi.json); a 401 signs out (token revoked or service restarted).
export async function api(path, { method = "GET", body } = {}) {
  if (token === null) throw new ApiError(401, "not signed in");
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers, cache: "no-store",
                            body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, `the service did not answer (${e.message})`);
  }
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (r.status === 401) {
    signOut();
  }
  if (!r.ok) throw new ApiError(r.status, data && data.detail !== undefined ? data.detail : `HTTP ${r.status}`);
  return data;
}

// The string of any error, for display (textContent).
export function describe(error) {
  if (error instanceof ApiError && Array.isArray(error.detail)) {
    return error.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("\n");
  }
  return error instanceof Error ? error.message : String(error);
}
