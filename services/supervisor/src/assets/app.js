// Live counters of the overview: polls /dashboard/overview.json and updates the page in place.
(function () {
  "use strict";
  var counters = document.getElementById("counters");
  if (!counters) { return; }
  var every = parseInt(counters.getAttribute("data-refresh-ms"), 10) || 2000;
  function fmt(key, v) {
    if (v === null || v === undefined) { return "\u2013"; }
    return /PerSecond$/.test(key) ? Number(v).toFixed(1) : String(v);
  }
  function clock(t) {
    return t ? new Date(t).toISOString().substring(11, 19) + " UTC" : "\u2013";
  }
  function alertText(id, text) {
    var el = document.getElementById(id);
    if (el) { el.textContent = text || ""; el.hidden = !text; }
  }
  // The same row as the server renders (dashboard.rs `partition_row`).
  function partitionRow(p) {
    var tr = document.createElement("tr");
    tr.id = "partition-" + p.partition;
    tr.className = p.stalled ? "stalled" : "ok";
    tr.setAttribute("data-stalled", p.stalled ? "true" : "false");
    tr.appendChild(cell(p.partition));
    tr.appendChild(cell(p.owner || "\u2013"));
    tr.appendChild(cell(p.ownerAlive ? "yes" : "no"));
    tr.appendChild(cell(clock(p.leaseExpiresAt)));
    tr.appendChild(cell(p.checkpoint + "." + p.checkpointIndex));
    tr.appendChild(cell(p.lagSeconds == null ? "\u2013" : Number(p.lagSeconds).toFixed(2)));
    var status = cell(p.stalled ? "STALLED: " + (p.stallReasons || []).join("; ") : "ok");
    status.className = "status";
    tr.appendChild(status);
    return tr;
  }
  function waitingRow(r) {
    var tr = document.createElement("tr");
    tr.appendChild(cell(r.step));
    tr.appendChild(cell(r.reason));
    tr.appendChild(cell(r.count));
    tr.appendChild(cell(clock(r.nextWakeAt)));
    var example = document.createElement("td");
    if (r.exampleDeliveryId) {
      var a = document.createElement("a");
      a.href = "/dashboard/sagas/" + encodeURIComponent(r.exampleDeliveryId);
      a.textContent = r.exampleDeliveryId;
      example.appendChild(a);
    } else {
      example.textContent = "\u2013";
    }
    tr.appendChild(example);
    tr.appendChild(cell(r.lastError || "\u2013"));
    return tr;
  }
  // The same text as the server writes (dashboard.rs `downstream_text`).
  function downstreamText(s) {
    var state = s.state === "open" ? "OPEN" : s.state;
    var details = [];
    if (s.state === "open" && s.nextProbeAt) { details.push("next probe " + clock(s.nextProbeAt)); }
    if (s.rejected > 0) { details.push(s.rejected + " rejected"); }
    var on = s.notClosedOn || [];
    var text = s.service + " " + state;
    if (details.length || on.length) {
      text += " (" + details.join(", ");
      if (on.length) { text += (details.length ? "; " : "") + "on " + on.join(", "); }
      text += ")";
    }
    return text;
  }
  function renderDownstream(d) {
    var list = document.getElementById("downstream-services");
    if (!list || !d) { return; }
    while (list.firstChild) { list.removeChild(list.firstChild); }
    (d.services || []).forEach(function (s, i) {
      if (i > 0) { list.appendChild(document.createTextNode(" \u00b7 ")); }
      var span = document.createElement("span");
      span.className = "breaker breaker-" + s.state;
      span.setAttribute("data-service", s.service);
      span.setAttribute("data-state", s.state);
      span.textContent = downstreamText(s);
      list.appendChild(span);
    });
    if (!(d.services || []).length) {
      var none = document.createElement("span");
      none.className = "muted";
      none.textContent = "not known";
      list.appendChild(none);
    }
    var errors = d.errors || [];
    alertText("downstream-errors", errors.length ? "(not told by " + errors.join("; ") + ")" : "");
  }
  function cell(text) {
    var td = document.createElement("td");
    td.textContent = text;
    return td;
  }
  function render(o) {
    var els = counters.querySelectorAll("[data-counter]");
    for (var i = 0; i < els.length; i++) {
      var key = els[i].getAttribute("data-counter");
      if (key in o) { els[i].textContent = fmt(key, o[key]); }
    }
    var body = document.querySelector("#partitions tbody");
    if (body && o.partitions) {
      while (body.firstChild) { body.removeChild(body.firstChild); }
      o.partitions.forEach(function (p) { body.appendChild(partitionRow(p)); });
    }
    var waiting = document.querySelector("#waiting tbody");
    if (waiting && o.waitingReasons) {
      while (waiting.firstChild) { waiting.removeChild(waiting.firstChild); }
      o.waitingReasons.forEach(function (r) { waiting.appendChild(waitingRow(r)); });
    }
    renderDownstream(o.downstream);
    alertText("partitions-error", o.partitionsError);
    alertText("waiting-error", o.waitingError);
    var at = document.getElementById("updated-at");
    if (at && o.at) { at.textContent = new Date(o.at).toISOString().substring(11, 19) + " UTC"; }
  }
  function tick() {
    fetch("/dashboard/overview.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 401) { window.location = "/login?next=/dashboard"; return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (o) { if (o) { render(o); } })
      .catch(function () { /* next tick */ })
      .then(function () { window.setTimeout(tick, every); });
  }
  window.setTimeout(tick, every);
})();
