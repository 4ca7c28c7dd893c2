/* An SAE's index page: the feature table (search, sort, hide dead features, pages of 100 rows) and the
   feature map. The table's rows arrive as summary chunk scripts, loaded one after another with <script>
   tags (file:// pages may not use the fetch API), and the table redraws as each chunk lands.
   Summary row: [feature, count, density, max, mean_nonzero, top tokens, explanation, detection AUROC,
   fuzzing AUROC, specificity, taxonomy] (the last five empty or null without saecore explain / score / token-scores). */
(function () {
  "use strict";
  var SC = window.SC, el = SC.el;
  var S = window.SAECORE_SAE || {}, M = window.SAECORE_MAP || null;
  var PER_PAGE = 100;
  var rows = [], byFeature = {};
  var state = { query: "", sort: "feature", hideDead: true, page: 0, taxonomy: "" };
  var app = document.getElementById("app");
  app.textContent = "";

  var href = function (f) { return SC.featureHref(f, S.per_folder || 1000); };

  /* ---- layout ---- */
  app.appendChild(el("header", { cls: "top" },
    el("span", { cls: "brand" }, el("a", { href: "../index.html", text: "saecore" })),
    el("span", { text: S.sae }), el("span", { cls: "spacer" }),
    el("span", { cls: "muted", id: "loaded", text: "loading…" })));
  app.appendChild(el("h1", { text: S.sae + ": " + SC.int(S.n_features) + " features" +
    (S.alive !== null && S.alive !== undefined ? " (" + SC.int(S.alive) + " alive)" : "") }));
  if (S.model) app.appendChild(el("div", { cls: "muted", text: "model " + S.model + (S.n_tokens ? " · " + SC.int(S.n_tokens) + " tokens indexed" : "") }));

  var top = el("div", { cls: "grid" });
  if (M) {
    var mapCard = el("section", { cls: "card", id: "map-card" }, el("h2", { text: "Feature map" }),
      el("div", { cls: "muted small", text: "Decoder directions in 2-D; colour = log density (blue rare, orange dense)" +
        (M.saes.length > 1 ? "; grey and other colours: " + M.saes.filter(function (x) { return x !== M.sae; }).join(", ") : "") +
        ". Click a point to open its feature." }));
    var wrap = el("div", { cls: "map-wrap" });
    var canvas = el("canvas", { id: "map" });
    var tip = el("div", { id: "map-tip" });
    wrap.appendChild(canvas); wrap.appendChild(tip); mapCard.appendChild(wrap);
    top.appendChild(mapCard);
  }
  if (S.density_histogram && S.density_histogram.length) {
    var dc = el("section", { cls: "card", id: "density-card" }, el("h2", { text: "Feature density" }));
    dc.appendChild(SC.densityChart(S.density_histogram));
    dc.appendChild(el("div", { cls: "muted small", text: "Number of features by the fraction of tokens they fire on (dead features are not shown)." }));
    top.appendChild(dc);
  }
  if (S.saebench && S.saebench.metrics) {
    var sb = el("section", { cls: "card", id: "saebench-card" }, el("h2", { text: "SAEBench metrics" }));
    var sbt = el("table", { id: "saebench-table" });
    Object.keys(S.saebench.metrics).forEach(function (k) {
      var v = S.saebench.metrics[k];
      sbt.appendChild(el("tr", {}, el("td", { text: k }),
        el("td", { text: v === null ? "—" : (typeof v === "number" ? String(Math.round(v * 1e4) / 1e4) : String(v)) })));
    });
    sb.appendChild(sbt);
    if (S.saebench.plot) sb.appendChild(el("img", { src: S.saebench.plot, alt: "SAEBench summary plot", style: "max-width:100%" }));
    sb.appendChild(el("div", { cls: "muted small", text: "From saecore eval --suite (docs/benchmarks.md)." }));
    top.appendChild(sb);
  }
  var A = S.autointerp;
  if (A && A.specificity_curve) {
    var sc = el("section", { cls: "card", id: "specificity-card" }, el("h2", { text: "Specificity by activation level" }));
    sc.appendChild(SC.lineChart(A.specificity_curve));
    var means = el("table", { id: "autointerp-summary" }, el("tr", {}, el("th", { text: "explanation" }),
      el("th", { cls: "num", text: "features" }), el("th", { cls: "num", text: "detection AUROC" }),
      el("th", { cls: "num", text: "fuzzing AUROC" }), el("th", { cls: "num", text: "specificity" })));
    Object.keys(A.kinds || {}).forEach(function (k) {
      var m = A.kinds[k];
      means.appendChild(el("tr", {}, el("td", { text: k }), el("td", { cls: "num", text: SC.int(m.features) }),
        el("td", { cls: "num", text: SC.num(m.detection_auroc, 3) }), el("td", { cls: "num", text: SC.num(m.fuzzing_auroc, 3) }),
        el("td", { cls: "num", text: SC.num(m.specificity, 3) })));
    });
    sc.appendChild(means);
    sc.appendChild(el("div", { cls: "muted small", text: "Mean 0–3 rating by " + A.scorer + " of held-out contexts against each explanation, by activation level " +
      "(fraction of the feature's max; 0 = silent contexts). model = the explainer's explanation; shuffled and top_tokens are baselines." }));
    top.appendChild(sc);
  }
  if (top.childNodes.length) app.appendChild(top);

  var search = el("input", { type: "search", id: "search", placeholder: "feature id (e.g. 42) or top token", "aria-label": "search" });
  var sort = el("select", { id: "sort", "aria-label": "sort" },
    el("option", { value: "feature", text: "feature id" }),
    el("option", { value: "density", text: "density (high first)" }),
    el("option", { value: "density-asc", text: "density (low first)" }),
    el("option", { value: "max", text: "max activation (high first)" }),
    el("option", { value: "detection", text: "detection AUROC (high first)" }),
    el("option", { value: "fuzzing", text: "fuzzing AUROC (high first)" }),
    el("option", { value: "specificity", text: "specificity (high first)" }));
  var taxonomy = el("select", { id: "taxonomy", "aria-label": "taxonomy" }, el("option", { value: "", text: "any taxonomy" }));
  var taxonomies = {};
  var hide = el("input", { type: "checkbox", id: "hide-dead" });
  hide.checked = true;
  var tableCard = el("section", { cls: "card", id: "features" });
  tableCard.appendChild(el("div", { cls: "controls" }, search,
    el("label", {}, "sort by ", sort), el("label", {}, "show ", taxonomy), el("label", {}, hide, " hide dead features"),
    el("span", { cls: "muted", id: "match-count" })));
  var table = el("table", { id: "feature-table" });
  tableCard.appendChild(table);
  var prev = el("button", { id: "prev-page", text: "← previous" }), next = el("button", { id: "next-page", text: "next →" });
  var pageInfo = el("span", { cls: "muted", id: "page-info" });
  tableCard.appendChild(el("div", { cls: "pager" }, prev, pageInfo, next));
  app.appendChild(tableCard);

  /* ---- filtering and sorting ---- */
  function matches() {
    var q = state.query.trim(), out;
    var id = /^#?(\d+)$/.exec(q);
    if (id) {
      var r = byFeature[+id[1]];
      return r ? [r] : [];
    }
    var ql = q.toLowerCase();
    out = rows.filter(function (r) {
      if (state.hideDead && r[1] === 0) return false;
      if (state.taxonomy && r[10] !== state.taxonomy) return false;
      return !ql || (r[5] || "").toLowerCase().indexOf(ql) >= 0 || (r[6] || "").toLowerCase().indexOf(ql) >= 0;
    });
    var key = { feature: function (r) { return r[0]; }, density: function (r) { return -(r[2] || 0); },
                "density-asc": function (r) { return r[2] === null ? Infinity : r[2]; }, max: function (r) { return -(r[3] || 0); },
                detection: score(7), fuzzing: score(8), specificity: score(9) }[state.sort];
    out.sort(function (a, b) { return key(a) - key(b) || a[0] - b[0]; });
    return out;
  }

  /* Sort key of a score column: high first, features without the score last. */
  function score(i) { return function (r) { return r[i] === null || r[i] === undefined ? Infinity : -r[i]; }; }

  var current = [];
  function render() {
    current = matches();
    var pages = Math.max(1, Math.ceil(current.length / PER_PAGE));
    state.page = Math.min(state.page, pages - 1);
    table.textContent = "";
    table.appendChild(el("tr", {}, el("th", { text: "feature" }), el("th", { cls: "num", text: "density" }),
      el("th", { cls: "num", text: "count" }), el("th", { cls: "num", text: "max act." }),
      el("th", { cls: "num", text: "mean act." }), el("th", { text: "top tokens" }), el("th", { text: "explanation" }),
      el("th", { cls: "num", text: "det. AUROC" }), el("th", { text: "taxonomy" })));
    current.slice(state.page * PER_PAGE, (state.page + 1) * PER_PAGE).forEach(function (r) {
      table.appendChild(el("tr", { cls: r[1] === 0 ? "dead" : "", "data-feature": r[0] },
        el("td", {}, el("a", { href: href(r[0]), cls: "feature-link", text: "#" + r[0] })),
        el("td", { cls: "num", text: SC.pct(r[2]) }), el("td", { cls: "num", text: SC.int(r[1]) }),
        el("td", { cls: "num", text: SC.num(r[3]) }), el("td", { cls: "num", text: SC.num(r[4]) }),
        el("td", { cls: "mono", text: r[5] || "" }), el("td", { cls: "explanation-cell", text: r[6] || "" }),
        el("td", { cls: "num", text: r[7] === null || r[7] === undefined ? "" : SC.num(r[7], 3) }),
        el("td", { cls: "small", text: r[10] || "" })));
    });
    document.getElementById("match-count").textContent = SC.int(current.length) + " shown";
    pageInfo.textContent = "page " + (state.page + 1) + " of " + pages;
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    drawMap();
  }

  search.addEventListener("input", function () { state.query = search.value; state.page = 0; render(); });
  search.addEventListener("keydown", function (e) {
    var id = /^#?(\d+)$/.exec(search.value.trim());
    if (e.key === "Enter" && id && byFeature[+id[1]]) window.location.href = href(+id[1]);
  });
  taxonomy.addEventListener("change", function () { state.taxonomy = taxonomy.value; state.page = 0; render(); });
  sort.addEventListener("change", function () { state.sort = sort.value; state.page = 0; render(); });
  hide.addEventListener("change", function () { state.hideDead = hide.checked; state.page = 0; render(); });
  prev.addEventListener("click", function () { state.page--; render(); });
  next.addEventListener("click", function () { state.page++; render(); });

  /* ---- the feature map (plain canvas) ---- */
  var mapView = null;
  function drawMap() {
    if (!M) return;
    var rect = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(rect.width * dpr));
    canvas.height = Math.max(1, Math.round(rect.height * dpr));
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, rect.width, rect.height);
    var n = M.f.length, xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity, i;
    for (i = 0; i < n; i++) {
      xmin = Math.min(xmin, M.x[i]); xmax = Math.max(xmax, M.x[i]); ymin = Math.min(ymin, M.y[i]); ymax = Math.max(ymax, M.y[i]);
    }
    var pad = 10, w = rect.width - 2 * pad, h = rect.height - 2 * pad;
    var sx = function (x) { return pad + (xmax > xmin ? (x - xmin) / (xmax - xmin) : 0.5) * w; };
    var sy = function (y) { return pad + (ymax > ymin ? 1 - (y - ymin) / (ymax - ymin) : 0.5) * h; };
    var own = M.saes.indexOf(M.sae);
    var filtering = state.query.trim() !== "";
    var selected = {};
    if (filtering) current.forEach(function (r) { selected[r[0]] = true; });
    var px = new Float32Array(n), py = new Float32Array(n);
    /* Colour spans the densities present (log scale), so a narrow range still shows contrast. */
    var dlo = Infinity, dhi = -Infinity;
    rows.forEach(function (r) { if (r[2] > 0) { var l = Math.log10(r[2]); dlo = Math.min(dlo, l); dhi = Math.max(dhi, l); } });
    if (!(dhi > dlo)) { dlo = -6; dhi = 0; }
    var radius = n > 5000 ? 1.8 : 3;
    var others = ["#adb5bd", "#74b816", "#7048e8", "#1098ad"]; /* the first other SAE in grey */
    for (i = 0; i < n; i++) {
      px[i] = sx(M.x[i]); py[i] = sy(M.y[i]);
      var colour, r = radius;
      if (M.s[i] === own) {
        var row = byFeature[M.f[i]];
        if (row && row[1] === 0 && state.hideDead) { px[i] = py[i] = -1e6; continue; } /* hidden: not clickable */
        var d = row && row[2] > 0 ? Math.log10(row[2]) : dlo;
        var t = Math.max(0, Math.min(1, (d - dlo) / (dhi - dlo)));
        colour = "hsl(" + Math.round(225 - 205 * t) + ", 80%, 45%)"; /* blue = rare … orange = dense */
        if (filtering) { if (selected[M.f[i]]) { colour = "#d9480f"; r = radius + 1; } else colour = "rgba(160,167,176,0.35)"; }
      } else {
        colour = others[(M.s[i] - (M.s[i] > own ? 1 : 0)) % others.length];
      }
      ctx.fillStyle = colour;
      ctx.beginPath(); ctx.arc(px[i], py[i], r, 0, 2 * Math.PI); ctx.fill();
    }
    mapView = { px: px, py: py };
    window.SAECORE_MAP_POINTS = mapView; /* screen positions, for tests and the console */
  }

  function nearest(ev) {
    if (!mapView) return -1;
    var rect = canvas.getBoundingClientRect(), x = ev.clientX - rect.left, y = ev.clientY - rect.top;
    var best = -1, bd = 64; /* within 8 px */
    for (var i = 0; i < mapView.px.length; i++) {
      var dx = mapView.px[i] - x, dy = mapView.py[i] - y, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }

  function mapHref(i) {
    var s = M.saes[M.s[i]];
    if (s === M.sae) return href(M.f[i]);
    return M.linked[M.s[i]] ? "../" + s + "/" + href(M.f[i]) : null;
  }

  if (M) {
    canvas.addEventListener("mousemove", function (ev) {
      var i = nearest(ev);
      if (i < 0) { tip.style.display = "none"; canvas.style.cursor = "crosshair"; return; }
      var row = M.s[i] === M.saes.indexOf(M.sae) ? byFeature[M.f[i]] : null;
      tip.textContent = M.saes[M.s[i]] + " #" + M.f[i] + (row ? " · " + SC.pct(row[2]) + (row[5] ? " · " + row[5] : "") : "");
      tip.style.left = (mapView.px[i] + 10) + "px"; tip.style.top = (mapView.py[i] + 10) + "px"; tip.style.display = "block";
      canvas.style.cursor = mapHref(i) ? "pointer" : "crosshair";
    });
    canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    canvas.addEventListener("click", function (ev) {
      var i = nearest(ev), target = i >= 0 ? mapHref(i) : null;
      if (target) window.location.href = target;
    });
    window.addEventListener("resize", drawMap);
  }

  /* ---- summary chunks, one script at a time ---- */
  var chunks = window.SAECORE_CHUNKS || [], next_chunk = 0;
  window.SAECORE_SUMMARY = window.SAECORE_SUMMARY || [];
  function absorb() {
    while (window.SAECORE_SUMMARY.length) {
      window.SAECORE_SUMMARY.shift().forEach(function (r) {
        rows.push(r); byFeature[r[0]] = r;
        if (r[10] && !taxonomies[r[10]]) { taxonomies[r[10]] = true; taxonomy.appendChild(el("option", { value: r[10], text: r[10] })); }
      });
    }
  }
  function loadNext() {
    if (next_chunk >= chunks.length) {
      document.getElementById("loaded").textContent = SC.int(rows.length) + " features loaded";
      document.body.setAttribute("data-loaded", "true");
      return;
    }
    var s = document.createElement("script");
    s.src = chunks[next_chunk++];
    s.onload = function () { absorb(); render(); loadNext(); };
    s.onerror = function () { document.getElementById("loaded").textContent = "could not load " + s.src; };
    document.body.appendChild(s);
  }
  render();
  loadNext();
})();
