// Spacehub console: live parts over EventSource. Pages work without it (read-only).
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const MAX_TAIL_CHARS = 200000;

  function text(el, value) { el.textContent = value === null || value === undefined ? "" : String(value); }
  function pct(value) { return value === null || value === undefined ? "" : value + "%"; }

  // -- fleet: rows that changed arrive as "hubs" events ---------------------------------------
  function fleet() {
    const table = document.getElementById("fleet");
    if (!table || !window.EventSource) return;
    const body = table.tBodies[0];
    const live = document.getElementById("live");
    const source = new EventSource(table.dataset.events);
    source.addEventListener("open", () => { if (live) live.hidden = false; });
    source.addEventListener("error", () => { if (live) live.hidden = true; });
    source.addEventListener("hubs", (event) => {
      const update = JSON.parse(event.data);
      for (const [name, value] of Object.entries(update.counts)) {
        const el = document.querySelector('[data-count="' + name + '"]');
        if (el) text(el, value);
      }
      for (const id of update.removed) {
        const row = document.getElementById("hub-" + id);
        if (row) row.remove();
      }
      for (const hub of update.rows) {
        let row = document.getElementById("hub-" + hub.id);
        if (!row) { row = newRow(hub.id); body.appendChild(row); }
        fill(row, hub);
      }
      const none = document.getElementById("no-hubs");
      if (none) none.hidden = body.rows.length > 0;
    });
  }

  // The table's columns in order, as cpm/console/fleet.py FIELDS makes them.
  const FIELDS = ["id", "state", "heartbeat", "cpu", "memory", "disk", "version", "tags", "instances", "connected", "disconnected"];

  // A timestamp to the minute, as the server renders it: "2026-12-03 23:35".
  function minute(stamp) { return typeof stamp === "string" && stamp.length >= 16 ? stamp.slice(0, 10) + " " + stamp.slice(11, 16) : ""; }

  function newRow(id) {
    const row = document.createElement("tr");
    row.id = "hub-" + id;
    for (let i = 0; i < FIELDS.length; i++) row.appendChild(document.createElement("td"));
    return row;
  }

  function fill(row, hub) {
    FIELDS.forEach((field, index) => {
      const cell = row.cells[index];
      if (field === "id") {
        cell.replaceChildren();
        const link = document.createElement("a");
        link.href = "/console/hubs/" + encodeURIComponent(hub.id);
        text(link, hub.id);
        cell.appendChild(link);
        if (hub.description) { const small = document.createElement("small"); text(small, hub.description); cell.appendChild(small); }
      } else if (field === "state") {
        cell.replaceChildren();
        const badge = document.createElement("span");
        badge.className = "state " + hub.state;
        text(badge, hub.state);
        cell.appendChild(badge);
      } else if (field === "cpu" || field === "memory" || field === "disk") {
        text(cell, pct(hub[field]));
      } else if (field === "tags") {
        text(cell, hub.tags.join(", "));
      } else if (field === "heartbeat") {
        text(cell, minute(hub.heartbeat) || "never");
      } else if (field === "connected" || field === "disconnected") {
        text(cell, minute(hub[field]));
      } else {
        text(cell, hub[field]);
      }
    });
  }

  // -- tails: a hub's log, an instance's streams ----------------------------------------------
  function tails() {
    for (const box of document.querySelectorAll("[data-tail]")) {
      if (!window.EventSource) continue;
      const pre = box.querySelector("[data-tail-text]");
      const state = box.querySelector(".tail-state");
      const pause = box.querySelector("[data-pause]");
      let paused = false, skipped = 0;
      const source = new EventSource(box.dataset.tail);
      const show = (value) => {
        if (paused) { skipped += value.length; text(state, "paused, " + skipped + " characters not shown"); return; }
        pre.append(value);
        if (pre.textContent.length > MAX_TAIL_CHARS) pre.textContent = pre.textContent.slice(-MAX_TAIL_CHARS);
        pre.scrollTop = pre.scrollHeight;
      };
      source.addEventListener("open", () => text(state, "live"));
      source.addEventListener("message", (event) => show(JSON.parse(event.data)));
      source.addEventListener("end", (event) => { text(state, JSON.parse(event.data)); source.close(); });
      source.addEventListener("failed", (event) => { text(state, JSON.parse(event.data)); source.close(); });
      source.addEventListener("error", () => { if (source.readyState !== EventSource.CLOSED) text(state, "reconnecting"); });
      pause.addEventListener("click", () => {
        paused = !paused; skipped = 0;
        text(pause, paused ? "Resume" : "Pause");
        text(state, paused ? "paused" : "live");
      });
      box.querySelector("[data-clear]").addEventListener("click", () => { pre.textContent = ""; });
    }
  }

  // -- uploading a package: the file as the raw body, the CSRF token as a header ----------------
  function upload() {
    const form = document.querySelector("[data-upload]");
    if (!form) return;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const file = form.querySelector('input[type="file"]').files[0];
      const status = form.querySelector("[data-upload-status]");
      if (!file) return;
      text(status, "uploading " + file.name + "…");
      try {
        const answer = await fetch(form.action, {
          method: "POST", body: file, credentials: "same-origin",
          headers: { "X-CSRF-Token": csrf, "Content-Type": "application/octet-stream" },
        });
        const body = await answer.json();
        if (!answer.ok) { text(status, "refused: " + (body.error || body.message || answer.status)); return; }
        text(status, "uploaded " + body.id);
        window.location.reload();
      } catch (error) {
        text(status, "failed: " + error);
      }
    });
  }

  // -- copy buttons and confirmations ---------------------------------------------------------
  function copies() {
    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", async () => {
        const source = document.getElementById(button.dataset.copy);
        const value = source.textContent;
        try {
          await navigator.clipboard.writeText(value);
        } catch (error) {
          const range = document.createRange();
          range.selectNodeContents(source);
          const selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          document.execCommand("copy");
        }
        const label = button.textContent;
        text(button, "Copied");
        setTimeout(() => text(button, label), 1500);
      });
    }
    for (const form of document.querySelectorAll("form[data-confirm]")) {
      form.addEventListener("submit", (event) => { if (!window.confirm(form.dataset.confirm)) event.preventDefault(); });
    }
  }

  fleet();
  tails();
  upload();
  copies();
})();
