// sandboxd's dashboard: one page, no framework. Everything it shows comes from the server's own API (the same
// routes the SDKs and the CLI use, with the API key the user logs in with, kept in this tab's sessionStorage);
// the terminal is xterm.js over the WebSocket /dashboard/terminal/{id} (src/sandboxd/dashboard/terminal.py).
// Data is put in the page with textContent only: nothing a sandbox or a client wrote is parsed as HTML.
import "@xterm/xterm/css/xterm.css";
import "uplot/dist/uPlot.min.css";
import "./style.css";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import uPlot from "uplot";

const KEY = "sandboxd.apiKey";
const ENVD_PORT = "49983";
let apiKey = sessionStorage.getItem(KEY) || "";
let cleanups = []; // what the current page must stop when another is shown

// -- helpers -------------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body, headers = {}) {
  const init = { method, headers: { "X-API-KEY": apiKey, ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (r.status === 401 && sessionStorage.getItem(KEY)) {
    // (a key that worked was revoked meanwhile; a login's wrong key is the login form's to say)
    logout("The server refused the API key: log in again.");
    throw new ApiError(401, "the API key was refused");
  }
  if (!r.ok) throw new ApiError(r.status, (data && data.message) || `${r.status} ${r.statusText}`);
  return { data, headers: r.headers };
}

function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await fn();
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) console.warn(e);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  cleanups.push(() => {
    stopped = true;
    clearTimeout(timer);
  });
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 0) return `in ${fmtSeconds(-s)}`;
  return `${fmtSeconds(s)} ago`;
}

function fmtSeconds(s) {
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function mib(bytes) {
  return bytes === undefined || bytes === null ? "" : `${Math.round(bytes / 1048576)} MiB`;
}

function banner(el, message, kind = "error") {
  el.replaceChildren(message ? h("div", { class: `banner ${kind}`, role: "alert" }, message) : "");
}

// -- layout --------------------------------------------------------------------------------------------
const root = document.getElementById("app");

function shell(active, ...content) {
  const nav = [
    ["#/sandboxes", "Sandboxes"],
    ["#/pools", "Pools"],
    ["#/templates", "Templates"],
  ].map(([href, label]) => h("a", { href, class: active === label ? "active" : "" }, label));
  root.replaceChildren(
    h(
      "header",
      {},
      h("span", { class: "brand" }, "sandboxd"),
      h("nav", {}, nav),
      h("button", { class: "link", onclick: () => logout("") }, "Log out"),
    ),
    h("main", {}, content),
  );
}

function logout(message) {
  apiKey = "";
  sessionStorage.removeItem(KEY);
  location.hash = "#/login";
  render(message);
}

function loginPage(message) {
  const input = h("input", {
    type: "password",
    name: "apiKey",
    placeholder: "e2b_…",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const note = h("div");
  banner(note, message);
  const form = h(
    "form",
    {
      class: "login",
      onsubmit: async (ev) => {
        ev.preventDefault();
        apiKey = input.value.trim();
        try {
          await api("GET", "/v2/sandboxes?limit=1");
          sessionStorage.setItem(KEY, apiKey);
          location.hash = "#/sandboxes";
        } catch (e) {
          apiKey = "";
          banner(note, e.status === 401 ? "That API key is not one of this server's." : e.message);
        }
      },
    },
    h("h1", {}, "sandboxd"),
    h("label", {}, "API key", input),
    h("p", { class: "hint" }, "The server prints its key at start; `sandboxd api-key` shows it, `sandboxd keys create` makes a team's."),
    h("button", { type: "submit" }, "Log in"),
    note,
  );
  root.replaceChildren(form);
  input.focus();
}

// -- sandboxes -----------------------------------------------------------------------------------------
function sandboxesPage() {
  const note = h("div");
  const stateSel = h(
    "select",
    { name: "state" },
    h("option", { value: "running,paused" }, "running and paused"),
    h("option", { value: "running" }, "running"),
    h("option", { value: "paused" }, "paused"),
    h("option", { value: "killed" }, "ended"),
  );
  const search = h("input", { type: "search", name: "q", placeholder: "filter: ID, template, metadata" });
  const templateSel = h("select", { name: "template" }, h("option", { value: "" }, "any template"));
  const newTemplate = h("select", { name: "newTemplate" });
  const body = h("tbody");
  const count = h("span", { class: "count" });
  let rows = [];
  let usage = {};

  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const shown = rows.filter((s) => {
      if (templateSel.value && s.templateID !== templateSel.value && s.alias !== templateSel.value) return false;
      if (!q) return true;
      const hay = [s.sandboxID, s.templateID, s.alias, JSON.stringify(s.metadata || {})].join(" ").toLowerCase();
      return hay.includes(q);
    });
    count.textContent = `${shown.length} of ${rows.length}`;
    body.replaceChildren(
      ...shown.map((s) => {
        const u = usage[s.sandboxID];
        const health = s.health && s.health.status ? s.health.status : "";
        return h(
          "tr",
          { "data-sandbox-id": s.sandboxID },
          h("td", {}, h("a", { href: `#/sandbox/${encodeURIComponent(s.sandboxID)}` }, s.sandboxID)),
          h("td", {}, s.alias || s.templateID),
          h("td", {}, h("span", { class: `state ${s.state}` }, s.state), health && health !== "healthy" ? h("span", { class: "state unhealthy" }, health) : ""),
          h("td", {}, u ? `${u.cpuUsedPct.toFixed(0)} %` : ""),
          h("td", {}, u ? mib(u.memUsed) : ""),
          h("td", { title: s.startedAt }, ago(s.startedAt)),
          h("td", { title: s.endAt }, s.state === "killed" ? ago(s.endedAt) : ago(s.endAt)),
          h("td", { class: "meta" }, Object.entries(s.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ")),
        );
      }),
    );
  };

  const refresh = async () => {
    const { data } = await api("GET", `/v2/sandboxes?limit=100&state=${encodeURIComponent(stateSel.value)}`);
    rows = data || [];
    const templates = [...new Set(rows.map((s) => s.alias || s.templateID))].sort();
    const chosen = templateSel.value;
    templateSel.replaceChildren(h("option", { value: "" }, "any template"), ...templates.map((t) => h("option", { value: t }, t)));
    templateSel.value = templates.includes(chosen) ? chosen : "";
    const live = rows.filter((s) => s.state === "running").map((s) => s.sandboxID);
    usage = {};
    if (live.length) {
      const { data: m } = await api("GET", `/sandboxes/metrics?sandbox_ids=${live.slice(0, 100).join(",")}`);
      usage = (m && m.sandboxes) || {};
    }
    banner(note, "");
    draw();
  };

  const create = async () => {
    try {
      const { data } = await api("POST", "/sandboxes", { templateID: newTemplate.value || "base" });
      location.hash = `#/sandbox/${encodeURIComponent(data.sandboxID)}`;
    } catch (e) {
      banner(note, `Could not create a sandbox: ${e.message}`);
    }
  };

  for (const el of [stateSel, templateSel]) el.addEventListener("change", () => refresh().catch((e) => banner(note, e.message)));
  search.addEventListener("input", draw);
  shell(
    "Sandboxes",
    h("div", { class: "toolbar" }, h("h2", {}, "Sandboxes"), count, stateSel, templateSel, search, h("span", { class: "grow" }), newTemplate, h("button", { onclick: create }, "New sandbox")),
    note,
    h("table", { class: "list sandboxes" }, h("thead", {}, h("tr", {}, ["ID", "template", "state", "CPU", "memory", "started", "ends", "metadata"].map((c) => h("th", {}, c)))), body),
  );
  api("GET", "/templates")
    .then(({ data }) => {
      const names = (data || []).filter((t) => t.buildStatus === "ready").map((t) => (t.names && t.names[0]) || t.templateID);
      newTemplate.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
      if (names.includes("base")) newTemplate.value = "base";
    })
    .catch(() => {});
  every(2000, refresh);
}

// -- one sandbox ---------------------------------------------------------------------------------------
function sandboxPage(id) {
  const note = h("div");
  const info = h("dl", { class: "info" });
  const actions = h("div", { class: "actions" });
  const cpuChart = h("div", { class: "chart" });
  const memChart = h("div", { class: "chart" });
  const logs = h("ol", { class: "logs" });
  const tree = h("ul", { class: "tree" });
  const preview = h("pre", { class: "preview" });
  const termBox = h("div", { class: "terminal", "data-testid": "terminal" });
  const termButton = h("button", { onclick: () => openTerminal() }, "Open terminal");
  let detail = null;
  let charts = null;
  let terminal = null;

  const act = (label, method, path, body, after) =>
    h(
      "button",
      {
        onclick: async () => {
          try {
            await api(method, path, body);
            if (after) after();
            else await refresh();
          } catch (e) {
            banner(note, `${label}: ${e.message}`);
          }
        },
      },
      label,
    );

  const refresh = async () => {
    try {
      ({ data: detail } = await api("GET", `/sandboxes/${encodeURIComponent(id)}`));
    } catch (e) {
      banner(note, e.message);
      return;
    }
    banner(note, "");
    const health = detail.health || {};
    const fields = [
      ["state", detail.state + (detail.pauseMode ? ` (${detail.pauseMode})` : "")],
      ["template", detail.alias || detail.templateID],
      ["health", health.status ? health.status + (health.reason ? `: ${health.reason}` : "") : ""],
      ["CPUs", detail.cpuCount],
      ["memory", `${detail.memoryMB} MiB`],
      ["started", `${detail.startedAt} (${ago(detail.startedAt)})`],
      ["ends", `${detail.endAt} (${ago(detail.endAt)})`],
      ["metadata", Object.entries(detail.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ")],
    ];
    info.replaceChildren(...fields.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k }, v)]));
    const running = detail.state === "running";
    actions.replaceChildren(
      running ? act("Pause", "POST", `/sandboxes/${id}/pause`) : act("Resume", "POST", `/sandboxes/${id}/connect`, { timeout: 300 }),
      act("Kill", "DELETE", `/sandboxes/${id}`, undefined, () => (location.hash = "#/sandboxes")),
    );
  };

  const drawMetrics = async () => {
    const { data } = await api("GET", `/sandboxes/${encodeURIComponent(id)}/metrics`);
    const samples = data || [];
    const t = samples.map((s) => Date.parse(s.timestamp) / 1000);
    const cpu = [t, samples.map((s) => s.cpuUsedPct)];
    const mem = [t, samples.map((s) => s.memUsed / 1048576)];
    if (!charts) {
      const opts = (title, label) => ({
        title,
        width: 460,
        height: 180,
        series: [{}, { label, stroke: "#2f6fde", fill: "rgba(47,111,222,0.1)" }],
        axes: [{}, { size: 60 }],
      });
      charts = [new uPlot(opts("CPU", "%"), cpu, cpuChart), new uPlot(opts("Memory", "MiB"), mem, memChart)];
    } else {
      charts[0].setData(cpu);
      charts[1].setData(mem);
    }
  };

  let logsSeen = 0;
  const drawLogs = async () => {
    const { data } = await api("GET", `/v2/sandboxes/${encodeURIComponent(id)}/logs?limit=1000&direction=forward`);
    const entries = (data && data.logs) || [];
    if (entries.length === logsSeen) return;
    logsSeen = entries.length;
    logs.replaceChildren(
      ...entries.slice(-300).map((e) => h("li", { class: `level-${e.level}` }, h("time", {}, (e.timestamp || "").replace("T", " ").slice(0, 19)), " ", e.message)),
    );
    logs.scrollTop = logs.scrollHeight;
  };

  const envd = (path, init = {}) => {
    if (!detail || detail.state !== "running") throw new ApiError(409, "the sandbox is not running: resume it to see its files");
    return fetch(path, {
      ...init,
      headers: {
        "E2b-Sandbox-Id": id,
        "E2b-Sandbox-Port": ENVD_PORT,
        "X-Access-Token": detail.envdAccessToken || "",
        Authorization: "Basic " + btoa("root:"),
        ...(init.headers || {}),
      },
    });
  };

  const listDir = async (path) => {
    const r = await envd("/filesystem.Filesystem/ListDir", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Connect-Protocol-Version": "1" },
      body: JSON.stringify({ path, depth: 1 }),
    });
    const data = await r.json();
    if (!r.ok) throw new ApiError(r.status, data.message || `${r.status}`);
    return (data.entries || []).sort((a, b) => (a.type === b.type ? a.name.localeCompare(b.name) : a.type === "FILE_TYPE_DIRECTORY" ? -1 : 1));
  };

  const branch = async (ul, path) => {
    try {
      const entries = await listDir(path);
      ul.replaceChildren(
        ...entries.map((e) => {
          const dir = e.type === "FILE_TYPE_DIRECTORY";
          const sub = h("ul");
          const li = h(
            "li",
            { class: dir ? "dir" : "file", "data-path": e.path },
            h(
              "button",
              {
                type: "button",
                class: "link",
                onclick: async () => {
                  if (dir) {
                    if (li.classList.toggle("open")) await branch(sub, e.path);
                    else sub.replaceChildren();
                  } else {
                    await show(e.path);
                  }
                },
              },
              e.name,
            ),
            dir ? "" : h("span", { class: "size" }, ` ${e.size ?? ""} B`),
            sub,
          );
          return li;
        }),
      );
    } catch (err) {
      ul.replaceChildren(h("li", { class: "error" }, err.message));
    }
  };

  const show = async (path) => {
    const r = await envd(`/files?path=${encodeURIComponent(path)}&username=root`, { headers: { Range: "bytes=0-65535" } });
    if (!r.ok) {
      preview.textContent = `${path}: ${r.status}`;
      return;
    }
    const buf = new Uint8Array(await r.arrayBuffer()).slice(0, 65536);
    const text = new TextDecoder("utf-8", { fatal: false }).decode(buf);
    preview.textContent = `${path}\n\n${text}${buf.length === 65536 ? "\n… (first 64 KiB)" : ""}`;
  };

  const openTerminal = () => {
    if (terminal) return;
    termButton.disabled = true;
    const term = new Terminal({ fontSize: 13, cursorBlink: true, scrollback: 2000, fontFamily: "ui-monospace, monospace" });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(termBox);
    fit.fit();
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/dashboard/terminal/${encodeURIComponent(id)}`);
    ws.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    ws.onopen = () => ws.send(JSON.stringify({ apiKey, cols: term.cols, rows: term.rows }));
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") termBox.dataset.status = ev.data;
      else term.write(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      term.write(`\r\n\x1b[2m[terminal closed${ev.reason ? ": " + ev.reason : ""}]\x1b[0m\r\n`);
      termBox.dataset.status = "closed";
      terminal = null;
      termButton.disabled = false;
    };
    term.onData((d) => ws.readyState === WebSocket.OPEN && ws.send(encoder.encode(d)));
    term.onResize(({ cols, rows }) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify({ resize: { cols, rows } })));
    const onWindow = () => fit.fit();
    window.addEventListener("resize", onWindow);
    terminal = { term, ws };
    cleanups.push(() => {
      window.removeEventListener("resize", onWindow);
      ws.close();
      term.dispose();
    });
    term.focus();
  };

  shell(
    "Sandboxes",
    h("div", { class: "toolbar" }, h("h2", {}, h("a", { href: "#/sandboxes" }, "Sandboxes"), " / ", h("span", { class: "id" }, id)), h("span", { class: "grow" }), actions),
    note,
    h("div", { class: "grid" }, h("section", {}, h("h3", {}, "Details"), info), h("section", {}, h("h3", {}, "Metrics"), cpuChart, memChart)),
    h("section", {}, h("div", { class: "toolbar" }, h("h3", {}, "Terminal"), termButton), termBox),
    h(
      "div",
      { class: "grid" },
      h("section", {}, h("div", { class: "toolbar" }, h("h3", {}, "Files"), h("button", { onclick: () => branch(tree, "/") }, "Reload")), tree),
      h("section", {}, h("h3", {}, "File"), preview),
    ),
    h("section", {}, h("h3", {}, "Log"), logs),
  );
  refresh().then(() => branch(tree, (detail && detail.state === "running" && "/") || "/"));
  every(2000, refresh);
  every(5000, drawMetrics);
  every(3000, drawLogs);
}

// -- pools ---------------------------------------------------------------------------------------------
function poolsPage() {
  const note = h("div");
  const body = h("tbody");
  const refresh = async () => {
    const { data } = await api("GET", "/pools");
    body.replaceChildren(
      ...(data || []).map((p) =>
        h(
          "tr",
          { "data-template": p.templateID },
          h("td", {}, p.templateID, p.custom ? "" : h("span", { class: "dim" }, " (defaults)")),
          ...["min", "max", "target", "idle", "hits", "misses"].map((k) => h("td", {}, p[k])),
        ),
      ),
    );
    banner(note, (data || []).length ? "" : "No pools yet: a template's pool starts with its first sandbox.", "info");
  };
  shell("Pools", h("div", { class: "toolbar" }, h("h2", {}, "Warm pools")), note, h("table", { class: "list" }, h("thead", {}, h("tr", {}, ["template", "min", "max", "target", "idle", "hits", "misses"].map((c) => h("th", {}, c)))), body));
  every(3000, refresh);
}

// -- templates -----------------------------------------------------------------------------------------
function templatesPage(id) {
  const note = h("div");
  const body = h("tbody");
  const builds = h("div");
  const buildLog = h("pre", { class: "preview buildlog" });

  const showBuild = async (tid, bid) => {
    const { data } = await api("GET", `/templates/${encodeURIComponent(tid)}/builds/${encodeURIComponent(bid)}/status?limit=1000`);
    buildLog.textContent = `${tid} build ${bid}: ${data.status}${data.reason ? " (" + (data.reason.message || JSON.stringify(data.reason)) + ")" : ""}\n\n` + (data.logEntries || []).map((e) => `${e.timestamp || ""} ${e.level} ${e.message}`).join("\n");
  };

  const showTemplate = async (tid) => {
    const { data } = await api("GET", `/templates/${encodeURIComponent(tid)}`);
    builds.replaceChildren(
      h("h3", {}, `Builds of ${(data.names && data.names[0]) || tid}`),
      h(
        "table",
        { class: "list" },
        h("thead", {}, h("tr", {}, ["build", "status", "created", "finished"].map((c) => h("th", {}, c)))),
        h(
          "tbody",
          {},
          (data.builds || []).map((b) =>
            h("tr", {}, h("td", {}, h("button", { type: "button", class: "link", onclick: () => showBuild(tid, b.buildID) }, b.buildID)), h("td", {}, b.status), h("td", {}, b.createdAt), h("td", {}, b.finishedAt || "")),
          ),
        ),
      ),
      (data.builds || []).length ? "" : h("p", { class: "dim" }, "No builds through the API (built by `sandboxd template build`: `sandboxd template logs` shows its log)."),
    );
  };

  const refresh = async () => {
    const { data } = await api("GET", "/templates");
    body.replaceChildren(
      ...(data || []).map((t) =>
        h(
          "tr",
          { "data-template": t.templateID },
          h("td", {}, h("a", { href: `#/templates/${encodeURIComponent(t.templateID)}` }, (t.names && t.names[0]) || t.templateID)),
          h("td", {}, t.templateID),
          h("td", {}, t.buildStatus),
          h("td", {}, mib(t.sizeBytes)),
          h("td", {}, (t.tags || []).join(" ")),
          h("td", {}, t.updatedAt),
        ),
      ),
    );
  };
  shell("Templates", h("div", { class: "toolbar" }, h("h2", {}, "Templates")), note, h("table", { class: "list" }, h("thead", {}, h("tr", {}, ["name", "ID", "status", "size", "tags", "built"].map((c) => h("th", {}, c)))), body), builds, buildLog);
  refresh().catch((e) => banner(note, e.message));
  if (id) showTemplate(id).catch((e) => banner(note, e.message));
}

// -- routing -------------------------------------------------------------------------------------------
function render(message) {
  for (const stop of cleanups) stop();
  cleanups = [];
  const route = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (!apiKey) return loginPage(message);
  switch (route[0]) {
    case "sandbox":
      return sandboxPage(route[1]);
    case "pools":
      return poolsPage();
    case "templates":
      return templatesPage(route[1]);
    case "login":
      location.hash = "#/sandboxes";
      return;
    default:
      return sandboxesPage();
  }
}

window.addEventListener("hashchange", () => render());
render();
