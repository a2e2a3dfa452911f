// The dashboard's shell: sign-in, hash routes, and a refresh loop for the page on show.
// Routes: #/jobs, #/jobs/<id>, #/cluster, #/sweeps, #/sweeps/new, #/sweeps/<id>, #/deployments,
// #/deployments/<id>. A hidden tab (document.visibilityState) polls nothing; shown again, it
// refreshes at once and resumes.

import { describe, onSignOut, signIn, signOut, signedIn } from "./api.js";
import { clusterPage } from "./cluster.js";
import { deploymentDetailPage, deploymentsPage } from "./deployments.js";
import { errorBox, replace } from "./dom.js";
import { jobDetailPage, jobsPage } from "./jobs.js";
import { sweepDetailPage, sweepsPage } from "./sweeps.js";
import { sweepFormPage } from "./sweepform.js";

// Live pages re-read the service this often; a refresh still in flight is never doubled.
const REFRESH_MS = 2000;

const ROUTES = [
  [/^#\/jobs\/([A-Za-z0-9_-]+)$/, jobDetailPage, "jobs"],
  [/^#\/jobs$/, jobsPage, "jobs"],
  [/^#\/sweeps\/new$/, sweepFormPage, "sweeps"],
  [/^#\/sweeps\/([A-Za-z0-9_-]+)$/, sweepDetailPage, "sweeps"],
  [/^#\/sweeps$/, sweepsPage, "sweeps"],
  [/^#\/cluster$/, clusterPage, "cluster"],
  [/^#\/deployments\/([A-Za-z0-9_-]+)$/, deploymentDetailPage, "deployments"],
  [/^#\/deployments$/, deploymentsPage, "deployments"],
];

const pageRoot = document.getElementById("page");
const form = document.getElementById("sign-in");
const nav = document.getElementById("nav");
let current = null; // {page, timer, busy}

function showSignIn() {
  stopPage();
  replace(pageRoot);
  nav.hidden = true;
  form.hidden = false;
  document.getElementById("token").focus();
}

// Polls the page on show while the tab is visible; none while it is hidden.
function schedule(state) {
  clearInterval(state.timer);
  state.timer = 0;
  if (state.page.live === false || document.visibilityState === "hidden") return;
  state.timer = setInterval(() => tick(state), REFRESH_MS);
}

function stopPage() {
  if (current) {
    clearInterval(current.timer);
    current.page.stop?.();
    current = null;
  }
}

async function tick(state) {
  if (state.busy || current !== state) return;
  state.busy = true;
  try {
    await state.page.refresh();
    state.error.textContent = "";
  } catch (e) {
    if (current === state) state.error.textContent = describe(e);
  } finally {
    state.busy = false;
  }
}

function route() {
  if (!signedIn()) {
    showSignIn();
    return;
  }
  form.hidden = true;
  nav.hidden = false;
  const hash = location.hash || "#/jobs";
  const match = ROUTES.map(([re, make, tab]) => [hash.match(re), make, tab]).find(([m]) => m);
  stopPage();
  const error = errorBox("");
  const body = document.createElement("div");
  replace(pageRoot, error, body);
  if (!match) {
    error.textContent = `no page ${hash}`;
    return;
  }
  const [m, make, tab] = match;
  for (const a of nav.querySelectorAll("a[data-page]")) a.classList.toggle("active", a.dataset.page === tab);
  const state = { page: make(body, ...m.slice(1)), timer: 0, busy: false, error };
  current = state;
  tick(state);
  schedule(state);
}

document.addEventListener("visibilitychange", () => {
  if (!current) return;
  if (document.visibilityState !== "hidden" && current.page.live !== false) tick(current);
  schedule(current);
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  const error = document.getElementById("sign-in-error");
  error.textContent = "";
  try {
    await signIn(input.value);
    input.value = "";
    route();
  } catch (e) {
    error.textContent = describe(e);
  }
});

document.getElementById("sign-out").addEventListener("click", () => signOut());
onSignOut(showSignIn);
window.addEventListener("hashchange", route);
route();
