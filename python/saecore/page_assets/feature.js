/* One feature's page: draws window.SAECORE_FEATURE (this feature's data, inline in the page) with the
   SAE-wide window.SAECORE_SAE (sae.js). A section whose table is absent is left out. */
(function () {
  "use strict";
  var SC = window.SC, el = SC.el;
  var F = window.SAECORE_FEATURE, S = window.SAECORE_SAE || {};
  var app = document.getElementById("app");
  app.textContent = "";

  function card(id, title) {
    var c = el("section", { cls: "card", id: id });
    if (title) c.appendChild(el("h2", { text: title }));
    return c;
  }

  /* Colour scale: the feature's max activation (from stats) or, without stats, the largest value shown. */
  var maxAct = F.stats && F.stats.max > 0 ? F.stats.max : 0;
  (F.top || []).forEach(function (e) { maxAct = Math.max(maxAct, e.v); });

  function header() {
    var h = el("header", { cls: "top" },
      el("span", { cls: "brand" }, el("a", { href: "../../../index.html", text: "saecore" })),
      el("a", { href: "../../index.html", text: F.sae, id: "sae-link" }),
      el("span", { text: "feature " + F.feature }),
      el("span", { cls: "spacer" }));
    if (F.href.prev) h.appendChild(el("a", { href: "../../" + F.href.prev, id: "prev", text: "← " + (F.feature - 1) }));
    if (F.href.next) h.appendChild(el("a", { href: "../../" + F.href.next, id: "next", text: (F.feature + 1) + " →" }));
    return h;
  }

  function overview() {
    var c = card("overview");
    c.appendChild(el("h1", { text: F.sae + " · feature " + F.feature }));
    var kv = el("div", { cls: "kv" });
    var add = function (label, value, id) { kv.appendChild(el("div", { id: id }, el("b", { text: value }), el("span", { text: label }))); };
    if (F.stats) {
      add("density (fraction of tokens)", SC.pct(F.stats.density), "density");
      add("activations", SC.int(F.stats.count), "count");
      add("max activation", SC.num(F.stats.max, 4), "max");
      add("mean when active", SC.num(F.stats.mean_nonzero, 4), "mean");
    }
    if (F.enc_dec_cosine !== null) add("encoder · decoder cosine", SC.num(F.enc_dec_cosine, 3), "enc-dec");
    if (F.token_scores) {
      add("taxonomy", F.token_scores.taxonomy, "taxonomy");
      add("token-simulator correlation", SC.num(F.token_scores.token_corr, 3), "token-corr");
      add("(previous, current) token correlation", SC.num(F.token_scores.pair_corr, 3), "pair-corr");
    }
    if (kv.childNodes.length) c.appendChild(kv);
    if (F.stats && F.stats.count === 0) c.appendChild(el("div", { cls: "note", text: "Dead feature: it never fired on the indexed tokens." }));
    return c;
  }

  /* The language model's explanation (model output: shown as text, never as HTML) and its scores beside
     the two baselines, on held-out contexts. */
  function explanationCard() {
    var A = F.autointerp;
    if (!A) return null;
    var c = card("explanation", "Explanation");
    if (A.explanation) {
      c.appendChild(el("div", { cls: "explanation", id: "explanation-text", text: A.explanation.explanation }));
      c.appendChild(el("div", { cls: "muted small", text: "by " + A.explanation.model + " from explain-side examples (saecore explain)" }));
    }
    if (A.scores && A.scores.length) {
      var t = el("table", { id: "autointerp-scores" }, el("tr", {}, el("th", { text: "explanation scored" }),
        el("th", { cls: "num", text: "detection bal. acc." }), el("th", { cls: "num", text: "detection AUROC" }),
        el("th", { cls: "num", text: "fuzzing bal. acc." }), el("th", { cls: "num", text: "fuzzing AUROC" }),
        el("th", { cls: "num", text: "specificity" })));
      A.scores.forEach(function (r) {
        t.appendChild(el("tr", { "data-kind": r.kind }, el("td", {}, el("b", { text: r.kind + ": " }), r.explanation),
          el("td", { cls: "num", text: SC.num(r.detection_accuracy, 3) }), el("td", { cls: "num", text: SC.num(r.detection_auroc, 3) }),
          el("td", { cls: "num", text: SC.num(r.fuzzing_accuracy, 3) }), el("td", { cls: "num", text: SC.num(r.fuzzing_auroc, 3) }),
          el("td", { cls: "num", text: SC.num(r.specificity, 3) })));
      });
      c.appendChild(t);
      c.appendChild(el("div", { cls: "muted small", text: "Held-out contexts (saecore score): " + A.scores[0].n_activating +
        " activating, " + A.scores[0].n_negative + " silent, " + A.scores[0].n_fuzzing + " fuzzing pairs. Baselines: shuffled = another " +
        "feature's explanation; top_tokens = the most frequent activating tokens. Specificity = mean 0–3 rating on activating minus silent contexts." }));
    }
    return c;
  }

  function densityCard() {
    if (!S.density_histogram || !S.density_histogram.length || !F.stats) return null;
    var c = card("density-card", "Density among all features of " + F.sae);
    var marker = F.stats.density > 0 ? Math.log10(F.stats.density) : undefined;
    c.appendChild(SC.densityChart(S.density_histogram, marker));
    return c;
  }

  function histogramCard() {
    if (!F.histogram || !F.histogram.length) return null;
    var c = card("histogram", "Activation histogram");
    var bins = F.histogram.map(function (b) { return { lo: b[0], hi: b[1], count: b[2] }; });
    c.appendChild(SC.barChart(bins, { logY: true }));
    c.appendChild(el("div", { cls: "muted small", text: "Activation value (log-spaced bins); bar height log(1 + count). Hover a bar for its count." }));
    return c;
  }

  function perTokenNote() {
    if (F.per_token === "all" || !F.context) return null;
    return el("div", { cls: "note", id: "per-token-note",
      text: "Only activations the index recorded (top-k and sampled rows) are shaded; other tokens in these windows may fire too. " +
            "Build the feature store (saecore encode) for full per-token shading." + (F.per_token_note ? " [" + F.per_token_note + "]" : "") });
  }

  function contextNote() {
    if (F.context) return null;
    return el("div", { cls: "note", text: "No activation store found for this index: examples show their row, document and position only." });
  }

  function topCard() {
    if (!F.top) return null;
    var c = card("top", "Top activations");
    [perTokenNote(), contextNote()].forEach(function (n) { if (n) c.appendChild(n); });
    if (!F.top.length) c.appendChild(el("div", { cls: "muted", text: "No activations recorded." }));
    F.top.forEach(function (ex) { c.appendChild(SC.example(ex, maxAct, F.tokens, F.vocab)); });
    return c;
  }

  function samplesCard() {
    if (!F.samples || !F.samples.length) return null;
    var c = card("samples", "Samples across activation levels (specificity view)");
    c.appendChild(el("div", { cls: "muted small", text: "Random activations drawn from each activation-level bin, strongest bin first. Strong activations tend to be specific; weak ones less so." }));
    F.samples.forEach(function (b) {
      var frac = maxAct > 0 ? " (" + Math.round(100 * b.lo / maxAct) + "–" + Math.round(100 * b.hi / maxAct) + "% of max)" : "";
      c.appendChild(el("div", { cls: "bin", text: "bin " + b.bin + ": activation " + SC.num(b.lo) + " – " + SC.num(b.hi) + frac }));
      b.examples.forEach(function (ex) { c.appendChild(SC.example(ex, maxAct, F.tokens, F.vocab)); });
    });
    return c;
  }

  function lensTable(title, rows, cls) {
    var t = el("table", {}, el("tr", {}, el("th", { text: title }), el("th", { cls: "num", text: "logit" })));
    rows.forEach(function (r) {
      t.appendChild(el("tr", {}, el("td", { cls: "tokcell", text: SC.showText(r[0]), title: JSON.stringify(r[0]) + " · id " + r[1] }),
        el("td", { cls: "num " + cls, text: SC.num(r[2], 3) })));
    });
    return t;
  }

  function lensPair(L) {
    return el("div", { cls: "lens" }, lensTable("promoted", L.promote, "pos"), lensTable("suppressed", L.suppress, "negv"));
  }

  function lensCard() {
    var L = F.logit_lens, E = F.logit_lens_encoder;
    var has = function (x) { return x && (x.promote.length || x.suppress.length); };
    if (!has(L) && !has(E)) return null;
    if (!has(E)) {
      var c = card("logit-lens", "Logit lens: tokens the decoder direction promotes and suppresses");
      c.appendChild(lensPair(L));
      return c;
    }
    var c2 = card("logit-lens", "Logit lens: the decoder direction (what the feature writes) and the encoder direction (what it reads)");
    if (F.enc_dec_cosine !== null) c2.appendChild(el("div", { cls: "muted small", id: "lens-cosine", text: "encoder · decoder cosine " + SC.num(F.enc_dec_cosine, 3) +
      "; the encoder direction is rescaled to the decoder row's norm, so the two lists' logits are on one scale." }));
    var pair = el("div", { cls: "lens-pair" });
    if (has(L)) pair.appendChild(el("div", { id: "lens-decoder" }, el("h3", { text: "decoder direction" }), lensPair(L)));
    pair.appendChild(el("div", { id: "lens-encoder" }, el("h3", { text: "encoder direction" }), lensPair(E)));
    c2.appendChild(pair);
    return c2;
  }

  /* saecore maximise: optimised token sequences beside the top dataset examples (text only via textContent). */
  function synthRows(t, label, rows) {
    rows.forEach(function (r, i) {
      var text = el("td", { cls: "tokcell" });
      r.tokens.forEach(function (tk) { text.appendChild(el("span", { cls: "tok", text: SC.showText(tk), title: JSON.stringify(tk) })); });
      t.appendChild(el("tr", { cls: "synth-" + label }, el("td", { text: label + " " + (i + 1) }), text,
        el("td", { cls: "num", text: SC.num(r.a, 4) }), el("td", { cls: "num", text: SC.num(r.retok, 4) }),
        el("td", { cls: "num", text: maxAct > 0 ? Math.round(100 * r.a / maxAct) + "%" : "–" })));
    });
  }

  function synthCard() {
    var M = F.maximise;
    if (!M) return null;
    var c = card("synthetic", "Synthetic max-activating text");
    c.appendChild(el("div", { cls: "muted small", text: "Token sequences optimised by greedy coordinate gradient (saecore maximise) to maximise this feature at the " +
      (M.position === "last" ? "last token" : "strongest token") + (M.fluency > 0 ? ", fluency λ = " + M.fluency : "") +
      "; random search had the same " + SC.int(M.evaluations) + " exact evaluations. 're-tokenized': the activation of the decoded text tokenized again." }));
    var t = el("table", {}, el("tr", {}, el("th", { text: "search" }), el("th", { text: "tokens" }), el("th", { cls: "num", text: "activation" }),
      el("th", { cls: "num", text: "re-tokenized" }), el("th", { cls: "num", text: "of dataset max" })));
    synthRows(t, "GCG", M.gcg);
    synthRows(t, "random", M.random);
    c.appendChild(t);
    var d = el("table", { id: "synthetic-dataset" }, el("tr", {}, el("th", { text: "top dataset examples («activating token»)" }), el("th", { cls: "num", text: "activation" })));
    M.dataset.forEach(function (e) { d.appendChild(el("tr", {}, el("td", { cls: "tokcell", text: SC.showText(e.text) }), el("td", { cls: "num", text: SC.num(e.v, 4) }))); });
    if (M.dataset.length) c.appendChild(d);
    else if (M.dataset_note) c.appendChild(el("div", { cls: "note", text: "No dataset examples: " + M.dataset_note }));
    return c;
  }

  /* saecore composite: the feature's decoder direction as a sparse sum of meta-SAE latents, and who shares them. */
  function compositeCard() {
    var D = F.composite;
    if (!D) return null;
    var c = card("composite", "Meta-SAE decomposition (is this feature a composite?)");
    c.appendChild(el("div", { cls: "muted small", text: SC.int(D.n_meta) + " meta-latent(s) reconstruct this decoder direction with cosine " +
      SC.num(D.cosine, 3) + "; " + SC.int(D.n_sharing) + " other feature(s) share at least one of them" +
      (D.most_shared_with >= 0 ? "; most overlap: feature #" + D.most_shared_with + " (Jaccard " + SC.num(D.jaccard, 2) + ")" : "") + "." }));
    var t = el("table", { id: "composite-meta" }, el("tr", {}, el("th", { text: "meta-latent" }), el("th", { cls: "num", text: "weight" }),
      el("th", { cls: "num", text: "features using it" }), el("th", { text: "other features weighing it most" })));
    D.meta.forEach(function (m) {
      var others = el("td", {});
      m.others.forEach(function (o, i) {
        if (i) others.appendChild(document.createTextNode(" "));
        others.appendChild(el("a", { href: o.href, cls: "meta-other", text: "#" + o.feature }));
      });
      t.appendChild(el("tr", {}, el("td", { text: "m" + m.m }), el("td", { cls: "num", text: SC.num(m.w, 3) }),
        el("td", { cls: "num", text: SC.int(m.users) }), others));
    });
    c.appendChild(t);
    return c;
  }

  function neighboursCard() {
    if (!F.neighbours || !F.neighbours.length) return null;
    var c = card("neighbours", "Nearest features by decoder cosine");
    var groups = {}, order = [];
    F.neighbours.forEach(function (n) { if (!groups[n.sae]) { groups[n.sae] = []; order.push(n.sae); } groups[n.sae].push(n); });
    order.sort(function (a, b) { return (a === F.sae ? -1 : 0) - (b === F.sae ? -1 : 0); });
    order.forEach(function (sae) {
      c.appendChild(el("div", { cls: "nb-sae", text: sae === F.sae ? "within " + sae : "in " + sae }));
      var t = el("table", {}, el("tr", {}, el("th", { text: "feature" }), el("th", { cls: "num", text: "cosine" })));
      groups[sae].forEach(function (n) {
        var label = (sae === F.sae ? "" : sae + " ") + "#" + n.feature;
        var link = n.href ? el("a", { href: n.href, cls: "neighbour", "data-sae": sae, "data-feature": n.feature, text: label })
                          : el("span", { cls: "muted", text: label + " (no pages)" });
        t.appendChild(el("tr", {}, el("td", {}, link), el("td", { cls: "num", text: SC.num(n.cosine, 3) })));
      });
      c.appendChild(t);
    });
    return c;
  }

  document.title = F.sae + " · feature " + F.feature;
  app.appendChild(header());
  app.appendChild(overview());
  var ex = explanationCard();
  if (ex) app.appendChild(ex);
  var charts = el("div", { cls: "grid" });
  [densityCard(), histogramCard()].forEach(function (x) { if (x) charts.appendChild(x); });
  if (charts.childNodes.length) app.appendChild(charts);
  [topCard(), samplesCard(), synthCard()].forEach(function (x) { if (x) app.appendChild(x); });
  var side = el("div", { cls: "grid" });
  var lens = lensCard(), wide = lens && lens.querySelector(".lens-pair");
  if (wide) app.appendChild(lens);  /* four lists need the full width */
  [wide ? null : lens, neighboursCard(), compositeCard()].forEach(function (x) { if (x) side.appendChild(x); });
  if (side.childNodes.length) app.appendChild(side);
})();
