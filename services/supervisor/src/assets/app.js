// Live counters of the overview: polls /dashboard/overview.json and updates the page in place.
(function () {
  "use strict";
  var counters = document.getElementById("counters");
  if (!counters) { return; }
  var every = parseInt(counters.getAttribute("data-refresh-ms"), 10) || 2000;
  function fmt(key, v) {
    return /PerSecond$/.test(key) ? Number(v).toFixed(1) : String(v);
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
      o.partitions.forEach(function (p) {
        var tr = document.createElement("tr");
        tr.appendChild(cell(p.partition));
        tr.appendChild(cell(p.owner));
        tr.appendChild(cell(p.checkpoint));
        tr.appendChild(cell(p.lagSeconds == null ? "–" : Number(p.lagSeconds).toFixed(2)));
        body.appendChild(tr);
      });
    }
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
