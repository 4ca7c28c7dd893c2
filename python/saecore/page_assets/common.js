/* Shared helpers of the saecore feature pages: DOM building, number formats, SVG bar charts, tokens.
   No libraries, no network: everything the pages need is in these files and the data scripts. */
(function () {
  "use strict";
  var SC = {};

  SC.el = function (tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (attrs[k] === null || attrs[k] === undefined) continue;
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  };

  SC.svg = function (tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    return node;
  };

  SC.num = function (x, digits) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential((digits || 3) - 1);
    return Number(x.toPrecision(digits || 3)).toString();
  };

  SC.int = function (x) { return x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US"); };

  SC.pct = function (d) {
    if (d === null || d === undefined) return "–";
    if (d === 0) return "0%";
    var p = d * 100;
    return (p >= 0.01 ? Number(p.toPrecision(3)) : p.toExponential(1)) + "%";
  };

  /* Visible form of a token's text: newlines and tabs become marks so one example stays on one line. */
  SC.showText = function (t) {
    if (t === "") return "∅";
    return t.replace(/\r?\n/g, "⏎").replace(/\t/g, "⇥");
  };

  SC.featureHref = function (feature, perFolder) {
    return "f/" + Math.floor(feature / perFolder) + "/" + feature + ".html";
  };

  /* Colour for an activation relative to the largest one: transparent at 0, saturated orange at max. */
  SC.actColour = function (a, max) {
    if (a === null || a === undefined || !(a > 0) || !(max > 0)) return "";
    var s = Math.min(1, a / max);
    return "rgba(247, 103, 7, " + (0.12 + 0.78 * s).toFixed(3) + ")";
  };

  /* One example: tokens of its window, each shaded by its activation; the example's own token outlined. */
  SC.example = function (ex, max, tokensAre, vocab) {
    var row = SC.el("div", { cls: "example", "data-row": ex.row });
    row.appendChild(SC.el("span", { cls: "val", text: SC.num(ex.v, 3) }));
    var text = SC.el("span", { cls: "text" });
    if (ex.c < 0) {
      text.appendChild(SC.el("span", { cls: "tok hit", style: "background:" + SC.actColour(ex.v, max),
        text: "row " + ex.row + " (doc " + ex.doc + ", position " + ex.pos + ")" }));
    } else {
      for (var i = 0; i < ex.id.length; i++) {
        var a = ex.a[i], raw = vocab[ex.id[i]];
        if (raw === undefined) raw = "#" + ex.id[i];
        var cls = "tok" + (i === ex.c ? " hit" : "") + (a === null ? " unknown" : "");
        var shown = tokensAre === "ids" ? "[" + ex.id[i] + "]" : SC.showText(raw);
        if (shown !== raw && tokensAre !== "ids") cls += " ctrl";
        var span = SC.el("span", { cls: cls, text: shown,
          title: JSON.stringify(raw) + " · id " + ex.id[i] + " · activation " + (a === null ? "not recorded" : SC.num(a, 3)) });
        var colour = SC.actColour(a, max);
        if (colour) span.style.background = colour;
        if (a !== null) span.setAttribute("data-act", a);
        text.appendChild(span);
      }
    }
    row.appendChild(text);
    return row;
  };

  /* Bar chart of bins [{lo, hi, count}] in an SVG; logY draws log10(1+count); marker: an x value to flag. */
  SC.barChart = function (bins, opts) {
    opts = opts || {};
    var W = 520, H = opts.height || 150, L = 8, R = 8, T = opts.marker !== undefined ? 16 : 8, B = 22;
    var svg = SC.svg("svg", { "class": "chart", viewBox: "0 0 " + W + " " + H, role: "img" });
    if (!bins.length) return svg;
    var x0 = bins[0].lo, x1 = bins[bins.length - 1].hi;
    if (opts.marker !== undefined && opts.marker !== null) { x0 = Math.min(x0, opts.marker); x1 = Math.max(x1, opts.marker); }
    if (!(x1 > x0)) x1 = x0 + 1;
    var height = function (c) { return opts.logY ? Math.log10(1 + c) : c; };
    var ymax = 0;
    bins.forEach(function (b) { ymax = Math.max(ymax, height(b.count)); });
    if (ymax === 0) ymax = 1;
    var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    bins.forEach(function (b) {
      var h = height(b.count) / ymax * (H - T - B);
      var r = SC.svg("rect", { "class": "bar", x: sx(b.lo), y: H - B - h, width: Math.max(1, sx(b.hi) - sx(b.lo) - 1), height: h });
      var t = SC.svg("title", {});
      t.textContent = (b.label || (SC.num(b.lo) + " – " + SC.num(b.hi))) + ": " + SC.int(b.count);
      r.appendChild(t);
      svg.appendChild(r);
    });
    var fmt = opts.tickFormat || function (x) { return SC.num(x); };
    [[x0, "start"], [x1, "end"]].forEach(function (p) {
      var t = SC.svg("text", { "class": "axis", x: sx(p[0]), y: H - 6, "text-anchor": p[1] });
      t.textContent = fmt(p[0]);
      svg.appendChild(t);
    });
    if (opts.marker !== undefined && opts.marker !== null) {
      svg.appendChild(SC.svg("line", { "class": "marker", x1: sx(opts.marker), x2: sx(opts.marker), y1: T, y2: H - B }));
      var right = sx(opts.marker) > W / 2;
      var mt = SC.svg("text", { "class": "axis marker-label", x: sx(opts.marker) + (right ? -3 : 3), y: T - 4, "text-anchor": right ? "end" : "start" });
      mt.textContent = opts.markerLabel || "";
      svg.appendChild(mt);
    }
    if (opts.axisLabel) {
      var al = SC.svg("text", { "class": "axis", x: W / 2, y: H - 6, "text-anchor": "middle" });
      al.textContent = opts.axisLabel;
      svg.appendChild(al);
    }
    return svg;
  };

  SC.densityChart = function (rows, markerLog10) {
    var bins = rows.map(function (r) { return { lo: r[0], hi: r[1], count: r[2], label: "10^" + r[0].toFixed(2) + " – 10^" + r[1].toFixed(2) }; });
    return SC.barChart(bins, { marker: markerLog10, markerLabel: markerLog10 === undefined ? "" : "this feature",
      tickFormat: function (x) { return "10^" + x.toFixed(1); }, axisLabel: "log10 density (fraction of tokens)", height: 130 });
  };

  /* Line chart of series {name: [{activation_level, mean_rating}]}: x in [0, 1], y in [0, 3] (the specificity curve). */
  SC.lineChart = function (series) {
    var W = 520, H = 200, L = 30, R = 90, T = 10, B = 26;
    var svg = SC.svg("svg", { "class": "chart line-chart", viewBox: "0 0 " + W + " " + H, role: "img" });
    var sx = function (x) { return L + x * (W - L - R); }, sy = function (y) { return H - B - y / 3 * (H - T - B); };
    [0, 1, 2, 3].forEach(function (y) {
      svg.appendChild(SC.svg("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#e2e5ea" }));
      var t = SC.svg("text", { "class": "axis", x: L - 6, y: sy(y) + 3, "text-anchor": "end" }); t.textContent = String(y); svg.appendChild(t);
    });
    [[0, "silent"], [0.5, "0.5"], [1, "max"]].forEach(function (p) {
      var t = SC.svg("text", { "class": "axis", x: sx(p[0]), y: H - 8, "text-anchor": "middle" }); t.textContent = p[1]; svg.appendChild(t);
    });
    var colours = ["#d9480f", "#4a7bd0", "#2b8a3e", "#7048e8"], k = 0;
    Object.keys(series).forEach(function (name) {
      var pts = series[name] || [], colour = colours[k++ % colours.length];
      if (!pts.length) return;
      var d = pts.map(function (p, i) { return (i ? "L" : "M") + sx(p.activation_level).toFixed(1) + "," + sy(p.mean_rating).toFixed(1); }).join(" ");
      svg.appendChild(SC.svg("path", { d: d, fill: "none", stroke: colour, "stroke-width": 2, "data-kind": name }));
      pts.forEach(function (p) {
        var c = SC.svg("circle", { cx: sx(p.activation_level), cy: sy(p.mean_rating), r: 3, fill: colour });
        var tt = SC.svg("title", {}); tt.textContent = name + ": level " + SC.num(p.activation_level) + ", mean rating " + SC.num(p.mean_rating) + " (" + p.contexts + " contexts)";
        c.appendChild(tt); svg.appendChild(c);
      });
      var label = SC.svg("text", { "class": "axis", x: W - R + 6, y: T + 12 * k, style: "fill:" + colour }); label.textContent = name; svg.appendChild(label);
    });
    return svg;
  };

  window.SC = SC;
})();
