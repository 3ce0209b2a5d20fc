// The gotunnel dashboard: log in, then poll the admin API every second and
// keep three tables (clients, ports, live connections) up to date, with byte
// rates worked out from successive polls.  Plain DOM, no framework, nothing
// loaded from anywhere but this server.  Every value from the server goes in
// through textContent, never as HTML.
"use strict";

(function () {
  const SESSION_KEY = "gotunnel.session";
  const POLL_MS = 1000;
  const REQUEST_TIMEOUT_MS = 5000;

  const $ = (id) => document.getElementById(id);

  let generation = 0;      // bumped at each log-in and log-out; stale answers are dropped
  let timer = null;
  let inFlight = false;
  let again = false;       // poll again as soon as the one in flight is done
  const seen = { ports: new Map(), connections: new Map() };  // key -> {time, bytesIn, bytesOut, rate}

  // ---- talking to the server ----------------------------------------------

  function session() {
    return sessionStorage.getItem(SESSION_KEY);
  }

  async function api(method, path, body) {
    const headers = {};
    const current = session();
    if (current) headers["Authorization"] = "Bearer " + current;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    init.signal = abort.signal;
    try {
      const response = await fetch(path, init);
      let data = null;
      try {
        data = await response.json();
      } catch (e) {
        data = null;
      }
      return { status: response.status, data };
    } finally {
      clearTimeout(timeout);
    }
  }

  // ---- log in and out -----------------------------------------------------

  async function logIn(event) {
    event.preventDefault();
    const token = $("login-token").value.trim();
    const user = $("login-user").value.trim();
    const password = $("login-password").value;
    if (!token && !user) {
      showLoginError("Enter the admin token, or a user and password.");
      return;
    }
    const body = token ? { token } : { user, password };
    $("login-submit").disabled = true;
    try {
      const { status, data } = await api("POST", "api/login", body);
      if (status === 200 && data && data.session) {
        sessionStorage.setItem(SESSION_KEY, data.session);
        $("login-form").reset();
        showDashboard();
      } else if (status === 401) {
        showLoginError(token ? "That token is not right." : "Wrong user or password.");
      } else {
        showLoginError("Log-in failed: " + ((data && data.error) || "HTTP " + status) + ".");
      }
    } catch (e) {
      showLoginError("The server did not answer.");
    } finally {
      $("login-submit").disabled = false;
    }
  }

  function showLoginError(message) {
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
  }

  function showLogin(message) {
    generation++;
    clearTimeout(timer);
    sessionStorage.removeItem(SESSION_KEY);
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    setStatus("idle", "");
    showLoginError(message);
    $("login-token").focus();
  }

  function showDashboard() {
    generation++;
    seen.ports.clear();
    seen.connections.clear();
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    setStatus("idle", "Connecting…");
    refreshNow();
  }

  // ---- polling ------------------------------------------------------------

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(poll, delay);
  }

  function refreshNow() {
    if (inFlight) again = true;
    else schedule(0);
  }

  async function poll() {
    if (inFlight) {
      again = true;
      return;
    }
    inFlight = true;
    const mine = generation;
    try {
      const { status, data } = await api("GET", "api/overview");
      if (mine !== generation) return;
      if (status === 401) {
        showLogin("Your session has ended: log in again.");
        return;
      }
      if (status !== 200 || !data) throw new Error("HTTP " + status);
      render(data);
      setStatus("live", "Live · " + clock(data.time));
    } catch (e) {
      if (mine === generation) setStatus("down", "No answer from the server; retrying");
    } finally {
      inFlight = false;
      if (!$("dashboard").hidden) {
        schedule(again ? 0 : POLL_MS);
        again = false;
      }
    }
  }

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  // ---- actions ------------------------------------------------------------

  function actionPath(button) {
    const row = button.closest("tr");
    switch (button.dataset.action) {
      case "disconnect":
        return "api/clients/" + encodeURIComponent(row.dataset.clientId) + "/disconnect";
      case "offline":
      case "online":
        return "api/ports/" + encodeURIComponent(row.dataset.target) + "/" + button.dataset.action;
      case "close":
        return "api/connections/" + encodeURIComponent(row.dataset.connId) + "/close";
    }
    return null;
  }

  async function act(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const path = actionPath(button);
    if (!path) return;
    button.disabled = true;
    try {
      const { status, data } = await api("POST", path);
      if (status === 401) {
        showLogin("Your session has ended: log in again.");
        return;
      }
      if (status === 200 && data && data.ok) notice(button.dataset.done);
      else if (status === 404) notice("Already gone.");
      else notice("That did not work: " + ((data && data.error) || "HTTP " + status) + ".");
    } catch (e) {
      notice("No answer from the server.");
    } finally {
      button.disabled = false;
      refreshNow();
    }
  }

  let noticeTimer = null;
  function notice(text) {
    const element = $("notice");
    element.textContent = text;
    element.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { element.hidden = true; }, 4000);
  }

  // ---- numbers for people -------------------------------------------------

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  function bytes(n) {
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < UNITS.length - 1) {
      value /= 1024;
      unit++;
    }
    const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
    return value.toFixed(digits) + " " + UNITS[unit];
  }

  function rate(perSecond) {
    return perSecond === null ? "–" : bytes(perSecond) + "/s";
  }

  function duration(seconds) {
    let s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    s = s % 60;
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    return m + " min " + s + " s";
  }

  function clock(time) {
    return new Date(time * 1000).toLocaleTimeString();
  }

  // Bytes per second since the last poll that saw this key; dropped keys are forgotten.
  function rates(store, items, keyOf, time) {
    const result = new Map();
    const keep = new Set();
    for (const item of items) {
      const key = String(keyOf(item));
      keep.add(key);
      const before = store.get(key);
      let value = { in: null, out: null };
      if (before && time <= before.time) {
        result.set(key, before.rate);
        continue;
      }
      if (before) {
        const dt = time - before.time;
        value = {
          in: Math.max(0, item.bytes_in - before.bytesIn) / dt,
          out: Math.max(0, item.bytes_out - before.bytesOut) / dt,
        };
      }
      store.set(key, { time, bytesIn: item.bytes_in, bytesOut: item.bytes_out, rate: value });
      result.set(key, value);
    }
    for (const key of Array.from(store.keys())) {
      if (!keep.has(key)) store.delete(key);
    }
    return result;
  }

  // ---- tables -------------------------------------------------------------

  // Rows are kept by key and only their cells change, so a row (and its
  // button) stays the same element from one poll to the next.
  function reconcile(table, items, keyOf, build, update, emptyText) {
    const body = table.tBodies[0];
    const rows = new Map();
    for (const row of Array.from(body.rows)) {
      if (row.dataset.key === undefined) row.remove();
      else rows.set(row.dataset.key, row);
    }
    items.forEach((item, index) => {
      const key = String(keyOf(item));
      let row = rows.get(key);
      if (row) rows.delete(key);
      else {
        row = build(item);
        row.dataset.key = key;
      }
      update(row, item);
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    });
    for (const row of rows.values()) row.remove();
    if (!items.length) {
      const row = body.insertRow();
      const cell = row.insertCell();
      cell.colSpan = table.tHead.rows[0].cells.length;
      cell.className = "empty";
      cell.textContent = emptyText;
    }
  }

  function makeRow(fields, numeric) {
    const row = document.createElement("tr");
    for (const field of fields) {
      const cell = row.insertCell();
      cell.dataset.field = field;
      if (numeric.includes(field)) cell.className = "num";
    }
    return row;
  }

  function cell(row, field) {
    return row.querySelector('td[data-field="' + field + '"]');
  }

  function set(row, field, text, value) {
    const target = cell(row, field);
    const shown = text === null || text === undefined || text === "" ? "–" : String(text);
    if (target.textContent !== shown) target.textContent = shown;
    if (value !== undefined) target.dataset.value = String(value);
  }

  function button(row, field, action, label, done, kind) {
    const target = cell(row, field);
    let element = target.querySelector("button");
    if (!element) {
      element = document.createElement("button");
      element.type = "button";
      target.appendChild(element);
    }
    element.dataset.action = action;
    element.dataset.done = done;
    element.className = "small " + (kind || "");
    if (element.textContent !== label) element.textContent = label;
  }

  function noButton(row, field) {
    const element = cell(row, field).querySelector("button");
    if (element) element.remove();
  }

  function badge(row, field, state) {
    const target = cell(row, field);
    let element = target.querySelector("span");
    if (!element) {
      element = document.createElement("span");
      target.appendChild(element);
    }
    element.className = "badge " + state;
    element.textContent = state;
    target.dataset.value = state;
  }

  const CLIENT_FIELDS = ["name", "address", "identity", "mappings", "connected", "heartbeat", "actions"];
  const PORT_FIELDS = ["remote_port", "client", "local_port", "state", "users", "bytes_in", "bytes_out",
                       "rate_in", "rate_out", "pool", "actions"];
  const PORT_NUMERIC = ["users", "bytes_in", "bytes_out", "rate_in", "rate_out", "pool"];
  const CONN_FIELDS = ["id", "remote_port", "client", "user", "bytes_in", "bytes_out", "rate_in", "rate_out",
                       "age", "actions"];
  const CONN_NUMERIC = ["bytes_in", "bytes_out", "rate_in", "rate_out", "age"];

  // A virtual host has remote_port 0, as every other: its scheme and domains tell it apart.
  // A UDP port is another port than the TCP one of its number: udp:53.
  function portName(p) {
    if (p.vhost) {
      return p.vhost + "://" + (p.domains || []).join(",");
    }
    return (p.protocol === "udp" ? "udp:" : "") + String(p.remote_port);
  }

  function render(data) {
    const time = data.time;
    const clients = data.clients || [];
    const ports = data.ports || [];
    const connections = data.connections || [];
    const portRates = rates(seen.ports, ports, portName, time);
    const connRates = rates(seen.connections, connections, (c) => c.id, time);

    reconcile($("clients"), clients, (c) => c.id,
      (c) => {
        const row = makeRow(CLIENT_FIELDS, []);
        row.dataset.clientId = c.id;
        return row;
      },
      (row, c) => {
        row.dataset.clientName = c.name;
        set(row, "name", c.name);
        set(row, "address", c.address);
        set(row, "identity", c.identity);
        set(row, "mappings", (c.mappings || []).map((m) => portName(m) + " → " + m.local_port).join(", "));
        set(row, "connected", duration(time - c.connected_since), c.connected_since);
        set(row, "heartbeat", duration(time - c.last_heartbeat) + " ago", c.last_heartbeat);
        button(row, "actions", "disconnect", "Disconnect", "Client " + c.name + " disconnected.", "danger");
      },
      "No client is connected.");

    reconcile($("ports"), ports, portName,
      (p) => {
        const row = makeRow(PORT_FIELDS, PORT_NUMERIC);
        row.dataset.port = String(p.remote_port);
        return row;
      },
      (row, p) => {
        const r = portRates.get(portName(p));
        // The actions name a port, or a virtual host by its client id (new when it registers again).
        row.dataset.target = p.vhost ? p.client_id : portName(p);
        row.dataset.state = p.state;
        set(row, "remote_port", portName(p));
        set(row, "client", p.client);
        set(row, "local_port", p.local_port);
        badge(row, "state", p.state);
        set(row, "users", p.users_now + " / " + p.users_total, p.users_now);
        set(row, "bytes_in", bytes(p.bytes_in), p.bytes_in);
        set(row, "bytes_out", bytes(p.bytes_out), p.bytes_out);
        set(row, "rate_in", rate(r.in), r.in === null ? "" : r.in);
        set(row, "rate_out", rate(r.out), r.out === null ? "" : r.out);
        set(row, "pool", p.pool);
        if (p.state === "leased") {
          // Held for a client that went: no listener to take offline or bring online.
          noButton(row, "actions");
        } else if (p.state === "offline") {
          button(row, "actions", "online", "Bring online", "Port " + portName(p) + " is online.", "");
        } else {
          button(row, "actions", "offline", "Take offline", "Port " + portName(p) + " is offline.", "");
        }
      },
      "No port is open.");

    reconcile($("connections"), connections, (c) => c.id,
      (c) => {
        const row = makeRow(CONN_FIELDS, CONN_NUMERIC);
        row.dataset.connId = c.id;
        return row;
      },
      (row, c) => {
        const r = connRates.get(String(c.id));
        row.dataset.port = String(c.remote_port);
        set(row, "id", c.id);
        set(row, "remote_port", portName(c));
        set(row, "client", c.client);
        set(row, "user", c.user);
        set(row, "bytes_in", bytes(c.bytes_in), c.bytes_in);
        set(row, "bytes_out", bytes(c.bytes_out), c.bytes_out);
        set(row, "rate_in", rate(r.in), r.in === null ? "" : r.in);
        set(row, "rate_out", rate(r.out), r.out === null ? "" : r.out);
        set(row, "age", duration(c.age), c.age);
        button(row, "actions", "close", "Close", "Connection " + c.id + " closed.", "danger");
      },
      "No live connection.");

    let totalIn = 0;
    let totalOut = 0;
    for (const r of portRates.values()) {
      totalIn += r.in || 0;
      totalOut += r.out || 0;
    }
    $("sum-clients").textContent = String(clients.length);
    $("sum-ports").textContent = ports.filter((p) => p.state === "online").length + " / " + ports.length;
    $("sum-connections").textContent = String(connections.length);
    $("sum-rate").textContent = rate(totalIn) + " / " + rate(totalOut);
  }

  // ---- start --------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", logIn);
    $("logout").addEventListener("click", () => showLogin(""));
    for (const id of ["clients", "ports", "connections"]) $(id).addEventListener("click", act);
    if (session()) showDashboard();
    else showLogin("");
  });
})();
