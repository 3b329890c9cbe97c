// The dashboard's only script: sign-in, live refresh of one region, cancel and retry buttons.
//
// The key lives in sessionStorage (this tab only) and travels only in the
// Authorization header of fetch() calls: never in a URL, never in the page,
// never in the console. Fragments arrive as HTML the server escaped; they are
// put in the live region as they are.
(() => {
  "use strict";

  const KEY = "supervisor.dashboard.key";
  const ENVIRONMENT = "supervisor.dashboard.environment";
  const POLL_MS = 2000;

  const body = document.body;
  const needsKey = body.dataset.auth === "key";
  const $ = (id) => document.getElementById(id);
  const main = $("main");
  const live = $("live");
  const signIn = $("sign-in");
  const signOut = $("sign-out");
  const connection = $("connection");
  const notice = $("notice");
  const who = $("who");

  let key = needsKey ? sessionStorage.getItem(KEY) : null;
  let environment = sessionStorage.getItem(ENVIRONMENT) || "default";
  let timer = null;
  let generation = 0;
  let shown = null; // the HTML now in the live region, to skip identical refreshes

  function authHeaders() {
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function dataUrl() {
    const src = live.dataset.src;
    if (!needsKey) return src + window.location.search;
    return "/dashboard/data/" + encodeURIComponent(environment) + "/" + src + window.location.search;
  }

  function setConnection(ok, message) {
    if (ok) {
      connection.textContent = "● live";
      connection.className = "connection ok";
      body.classList.remove("stale");
    } else {
      connection.textContent = "⚠ " + (message || "Connection lost — retrying…");
      connection.className = "connection lost";
      body.classList.add("stale");
    }
  }

  function showSignIn(message) {
    stop();
    key = null;
    sessionStorage.removeItem(KEY);
    live.replaceChildren(); // no data stays on the page once the key is gone
    shown = null;
    main.hidden = true;
    signIn.hidden = false;
    signOut.hidden = true;
    who.textContent = "";
    connection.textContent = "";
    connection.className = "connection";
    $("sign-in-error").textContent = message || "";
    $("environment").value = environment;
    $("key").focus();
  }

  function showMain() {
    if (signIn) signIn.hidden = true;
    main.hidden = false;
    if (needsKey) {
      signOut.hidden = false;
      who.textContent = "environment " + environment;
    }
  }

  async function errorText(response) {
    try {
      const data = await response.json();
      if (data && data.error && data.error.message) return data.error.message;
    } catch (_) {
      // not JSON: fall through to the status line
    }
    return "HTTP " + response.status;
  }

  // Replace the live region's content, keeping keyboard focus where it was.
  function swap(html) {
    if (shown === html) return;
    const active = document.activeElement;
    let focusId = null;
    let focusHref = null;
    if (active && live.contains(active)) {
      focusId = active.id || null;
      focusHref = active.getAttribute("href");
    }
    live.innerHTML = html;
    shown = html;
    live.setAttribute("aria-busy", "false");
    let target = null;
    if (focusId) target = document.getElementById(focusId);
    else if (focusHref) target = live.querySelector('a[href="' + CSS.escape(focusHref) + '"]');
    if (target) target.focus();
  }

  async function refresh() {
    const mine = generation;
    let response;
    try {
      response = await fetch(dataUrl(), { headers: authHeaders(), cache: "no-store" });
    } catch (_) {
      if (mine === generation) setConnection(false);
      return;
    }
    if (mine !== generation) return;
    if (response.status === 401 && needsKey) {
      showSignIn("The server refused the key (it may have been changed). Sign in again.");
      return;
    }
    if (!response.ok) {
      const text = await errorText(response);
      if (response.status >= 500) setConnection(false, "Server error: " + text);
      else {
        setConnection(true);
        const p = document.createElement("p");
        p.className = "error";
        p.setAttribute("role", "alert");
        p.textContent = text;
        live.replaceChildren(p);
        shown = null;
      }
      return;
    }
    setConnection(true);
    swap(await response.text());
  }

  function stop() {
    generation += 1;
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  function start() {
    stop();
    const mine = generation;
    const tick = async () => {
      if (document.visibilityState !== "hidden") await refresh();
      if (mine === generation) timer = setTimeout(tick, POLL_MS);
    };
    tick();
  }

  async function onSignIn(event) {
    event.preventDefault();
    const input = $("key");
    const candidate = input.value.trim();
    const env = $("environment").value.trim() || "default";
    const error = $("sign-in-error");
    error.textContent = "";
    if (!candidate) {
      error.textContent = "Enter the environment key.";
      return;
    }
    let response;
    try {
      response = await fetch("/v1/environments/" + encodeURIComponent(env) + "/work/stats", {
        headers: { Authorization: "Bearer " + candidate },
        cache: "no-store",
      });
    } catch (_) {
      error.textContent = "Cannot reach the server. Check that it is running, then try again.";
      return;
    }
    if (response.status === 401) {
      input.value = "";
      error.textContent = "That key was refused: it is not this server's environment key.";
      input.focus();
      return;
    }
    if (!response.ok) {
      error.textContent = "The server said: " + (await errorText(response));
      return;
    }
    input.value = "";
    key = candidate;
    environment = env;
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(ENVIRONMENT, environment);
    showMain();
    main.focus();
    start();
  }

  // Cancel (request-stop) and retry (a dead-letter item) call the same API as the CLI.
  const ACTIONS = {
    cancel: {
      path: "/request-stop",
      ask: (id) => "Cancel " + id + "? Its worker stops the session at its next heartbeat.",
      done: (id) => "Stop requested for " + id + ".",
      verb: "cancel",
    },
    retry: {
      path: "/retry",
      ask: (id) => "Retry " + id + "? It goes back to the queue with fresh attempts.",
      done: (id) => "Queued again: " + id + ".",
      verb: "retry",
    },
  };

  async function onAction(button, name) {
    const action = ACTIONS[name];
    const id = button.dataset[name];
    if (!window.confirm(action.ask(id))) {
      return;
    }
    button.disabled = true;
    let response;
    try {
      response = await fetch(
        "/v1/environments/" + encodeURIComponent(environment) + "/work/" +
          encodeURIComponent(id) + action.path,
        { method: "POST", headers: authHeaders(), cache: "no-store" },
      );
    } catch (_) {
      notice.textContent = "Could not reach the server to " + action.verb + " " + id + ".";
      button.disabled = false;
      setConnection(false);
      return;
    }
    if (response.status === 401) {
      showSignIn("The server refused the key. Sign in again.");
      return;
    }
    if (response.ok) {
      notice.textContent = action.done(id);
    } else {
      notice.textContent =
        "Could not " + action.verb + " " + id + ": " + (await errorText(response));
      button.disabled = false;
    }
    await refresh();
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-cancel], button[data-retry]");
    if (button && live.contains(button)) {
      onAction(button, button.dataset.cancel !== undefined ? "cancel" : "retry");
    }
  });

  if (needsKey) {
    $("sign-in-form").addEventListener("submit", onSignIn);
    signOut.addEventListener("click", () => showSignIn("Signed out."));
    if (key) {
      showMain();
      start();
    } else {
      showSignIn("");
    }
  } else {
    showMain();
    start();
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && timer !== null) refresh();
  });
})();
