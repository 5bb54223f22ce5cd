// Attention, Annotated: theme toggle, copy buttons, contents, display equations that fit, images
// opened larger, and search. No network: the search index is a script of the site, loaded the first
// time the reader searches.
(function () {
  "use strict";
  var root = document.documentElement;

  // Theme: follow the system unless the reader chose one; the choice is kept in localStorage.
  function effectiveTheme() {
    var t = root.getAttribute("data-theme");
    if (t === "light" || t === "dark") return t;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  var toggle = document.getElementById("theme-toggle");
  function label() {
    if (!toggle) return;
    var next = effectiveTheme() === "dark" ? "light" : "dark";
    toggle.setAttribute("aria-label", "Switch to the " + next + " theme");
    toggle.title = "Switch to the " + next + " theme";
  }
  if (toggle) {
    toggle.addEventListener("click", function () {
      var next = effectiveTheme() === "dark" ? "light" : "dark";
      root.setAttribute("data-theme", next);
      try { localStorage.setItem("theme", next); } catch (e) { /* storage may be off for file:// */ }
      label();
    });
    label();
  }

  // Copy buttons: copy the code without its line numbers (those are CSS content, not text).
  function copyText(text, done) {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
    } else { fallback(text); done(); }
  }
  function fallback(text) {
    var ta = document.createElement("textarea");
    ta.value = text; ta.setAttribute("readonly", ""); ta.style.position = "fixed"; ta.style.opacity = "0";
    document.body.appendChild(ta); ta.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    document.body.removeChild(ta);
  }
  Array.prototype.forEach.call(document.querySelectorAll(".codeblock .copy"), function (btn) {
    btn.addEventListener("click", function () {
      var code = btn.parentNode.querySelector("code");
      var text = Array.prototype.map.call(code.querySelectorAll(".line"), function (l) { return l.textContent; }).join("\n");
      copyText(text, function () {
        btn.textContent = "Copied"; btn.classList.add("done");
        setTimeout(function () { btn.textContent = "Copy"; btn.classList.remove("done"); }, 1500);
      });
    });
  });

  // Display equations: one wider than its column is set smaller, down to 70% (80% on a phone); past that it scrolls.
  function fitEquations() {
    Array.prototype.forEach.call(document.querySelectorAll(".math-display"), function (box) {
      box.style.fontSize = "";
      box.classList.remove("scrolls");
      if (!box.clientWidth) return;
      var need = box.scrollWidth, have = box.clientWidth;
      if (need > have + 1) {
        var scale = Math.max(window.innerWidth < 600 ? 0.8 : 0.7, (have - 2) / need);
        box.style.fontSize = (Math.floor(scale * 100) / 100) + "em";
        if (box.scrollWidth > box.clientWidth + 1) box.classList.add("scrolls");
      }
    });
  }
  var fitTimer = null;
  window.addEventListener("resize", function () { clearTimeout(fitTimer); fitTimer = setTimeout(fitEquations, 100); });
  if (document.fonts && document.fonts.ready) document.fonts.ready.then(fitEquations);
  fitEquations();

  // On this page: the heading being read is marked, and named in the top bar's button.
  var toc = document.getElementById("toc"), tocButton = document.getElementById("toc-toggle");
  if (toc) {
    var links = Array.prototype.slice.call(toc.querySelectorAll("a"));
    var targets = links.map(function (a) { return document.getElementById(decodeURIComponent(a.hash.slice(1))); });
    var current = tocButton && tocButton.querySelector(".toc-current");
    var update = function () {
      var k = -1;  // above the first heading: the page's opening
      for (var i = 0; i < targets.length; i++) {
        if (targets[i] && targets[i].getBoundingClientRect().top < 90) k = i;
      }
      links.forEach(function (a, i) { a.classList.toggle("current", i === k); });
      if (current) current.textContent = k < 0 ? "On this page" : links[k].getAttribute("data-label") || links[k].textContent.trim();
    };
    var ticking = false;
    window.addEventListener("scroll", function () {
      if (!ticking) { ticking = true; requestAnimationFrame(function () { ticking = false; update(); }); }
    }, { passive: true });
    update();
    if (tocButton) {
      var setOpen = function (open) { toc.classList.toggle("open", open); tocButton.setAttribute("aria-expanded", open ? "true" : "false"); };
      tocButton.addEventListener("click", function (ev) { ev.stopPropagation(); setOpen(!toc.classList.contains("open")); });
      toc.addEventListener("click", function (ev) { if (ev.target.closest("a")) setOpen(false); });
      document.addEventListener("click", function (ev) { if (!toc.contains(ev.target)) setOpen(false); });
      document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") setOpen(false); });
    }
  }

  // Images in prose and outputs open larger on click (the figure's link opens the file without JS).
  var box = null;
  function openImage(shown) {
    var src = shown.currentSrc || shown.src, alt = shown.alt;
    if (!box) {
      box = document.createElement("dialog");
      box.className = "lightbox"; box.id = "lightbox"; box.setAttribute("aria-label", "Image");
      box.appendChild(document.createElement("img"));
      box.addEventListener("click", function () { box.close(); });
      document.body.appendChild(box);
    }
    var img = box.querySelector("img");
    img.src = src; img.alt = alt || "";
    // Larger than on the page: its own size, or at least half as large again, as the screen allows.
    var w = Math.max(shown.naturalWidth || 0, shown.getBoundingClientRect().width * 1.6,
                     window.innerWidth < 600 ? window.innerWidth : 0);  // a phone: the screen's width
    var aspect = (shown.naturalHeight || 1) / (shown.naturalWidth || 1);
    w = Math.min(w, window.innerWidth * 0.96, window.innerHeight * 0.92 / aspect);
    img.style.width = Math.round(w) + "px";
    box.showModal();
  }
  Array.prototype.forEach.call(document.querySelectorAll("main img"), function (img) {
    var link = img.closest("a");
    if (link && !link.classList.contains("zoom")) return;  // an image that is a link stays a link
    img.classList.add("zoomable");
    (link || img).addEventListener("click", function (ev) { ev.preventDefault(); openImage(img); });
  });

  // Search: loaded on first use. Definitions whose name matches rank first, then headings, then text;
  // each entry is one section of a page. The page a result opens marks the words searched for.
  var input = document.getElementById("search-box");
  var list = document.getElementById("search-results");
  var prepared = null, waiting = [];
  function loadIndex(then) {
    if (prepared) { then(); return; }
    waiting.push(then);
    if (waiting.length > 1) return;  // already on its way
    var s = document.createElement("script");
    s.src = "assets/search-index.js";
    s.onload = function () {
      var index = Array.isArray(window.SEARCH_INDEX) ? window.SEARCH_INDEX : [];
      prepared = index.map(function (e) {
        return { e: e, def: e.k === "d", name: (e.h || "").toLowerCase(), head: (e.t + " " + e.h).toLowerCase(),
                 body: (e.x || "").toLowerCase() };
      });
      waiting.splice(0).forEach(function (f) { f(); });
    };
    document.head.appendChild(s);
  }
  function snippet(text, term) {
    var i = text.toLowerCase().indexOf(term);
    if (i < 0) return text.slice(0, 120);
    var s = Math.max(0, i - 40);
    return (s ? "…" : "") + text.slice(s, s + 120);
  }
  function search(q) {
    var terms = q.toLowerCase().split(/\s+/).filter(Boolean);
    if (!terms.length) return [];
    var whole = terms.join(" "), hits = [];
    prepared.forEach(function (p, order) {
      var score = 0;
      for (var i = 0; i < terms.length; i++) {
        var inName = p.def && p.name.indexOf(terms[i]) >= 0;
        var inHead = p.head.indexOf(terms[i]) >= 0, inBody = p.body.indexOf(terms[i]) >= 0;
        if (!inName && !inHead && !inBody) return;
        score += inName ? 10 : inHead ? 3 : 1;
      }
      if (p.def && (p.name === whole || p.name.split(".").pop() === whole)) score += 20;
      hits.push({ p: p, score: score, order: order });
    });
    hits.sort(function (a, b) { return b.score - a.score || a.order - b.order; });
    return hits.slice(0, 15).map(function (h) { return { e: h.p.e, def: h.p.def, term: terms[0] }; });
  }
  function withQuery(url, q) {
    var i = url.indexOf("#");
    var page = i < 0 ? url : url.slice(0, i), hash = i < 0 ? "" : url.slice(i);
    return page + "?q=" + encodeURIComponent(q) + hash;
  }
  function render(q) {
    list.innerHTML = "";
    if (!q.trim()) { list.hidden = true; return; }
    var hits = search(q);
    if (!hits.length) {
      var li = document.createElement("li"); li.className = "empty"; li.textContent = "No results for “" + q + "”";
      list.appendChild(li);
    }
    hits.forEach(function (h) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = withQuery(h.e.u, q.trim());
      if (h.def) { var k = document.createElement("span"); k.className = "r-kind"; k.textContent = "def"; a.appendChild(k); }
      var t = document.createElement("span"); t.className = "r-title"; t.textContent = h.e.h || h.e.t;
      var w = document.createElement("span"); w.className = "r-where"; w.textContent = "  " + h.e.t;
      var x = document.createElement("span"); x.className = "r-text"; x.textContent = snippet(h.e.x || "", h.term);
      a.appendChild(t); a.appendChild(w); a.appendChild(x); li.appendChild(a); list.appendChild(li);
    });
    list.hidden = false;
  }
  if (input && list) {
    input.addEventListener("focus", function () { loadIndex(function () {}); });
    input.addEventListener("input", function () { loadIndex(function () { render(input.value); }); });
    input.addEventListener("keydown", function (ev) {
      var links = list.querySelectorAll("a"), active = list.querySelector("a.active");
      var i = Array.prototype.indexOf.call(links, active);
      if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
        ev.preventDefault();
        if (active) active.classList.remove("active");
        i = ev.key === "ArrowDown" ? Math.min(links.length - 1, i + 1) : Math.max(0, i - 1);
        if (links[i]) { links[i].classList.add("active"); links[i].scrollIntoView({ block: "nearest" }); }
      } else if (ev.key === "Enter") {
        var target = active || links[0];
        if (target) window.location.href = target.href;
      } else if (ev.key === "Escape") {
        list.hidden = true; input.blur();
      }
    });
    document.addEventListener("keydown", function (ev) {
      if (ev.key === "/" && document.activeElement !== input) { ev.preventDefault(); input.focus(); }
    });
    document.addEventListener("click", function (ev) {
      if (!list.contains(ev.target) && ev.target !== input) list.hidden = true;
    });
  }

  // The words a search result was opened for, marked in the section it leads to (or the page).
  function markQuery() {
    var q = new URLSearchParams(window.location.search).get("q");
    if (!q) return;
    var terms = q.toLowerCase().split(/\s+/).filter(function (t) { return t.length > 1; });
    if (!terms.length) return;
    var id = decodeURIComponent(window.location.hash.slice(1));
    var scope = (id && document.getElementById(id)) || document.querySelector("main");
    scope = scope.closest(".section") || scope;
    var pattern = new RegExp(terms.map(function (t) { return t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }).join("|"), "gi");
    var nodes = [], walker = document.createTreeWalker(scope, NodeFilter.SHOW_TEXT);
    for (var n = walker.nextNode(); n; n = walker.nextNode()) {
      if (!n.parentElement.closest("math, script, style, .ln, .copy, .header-anchor, .section-link")) nodes.push(n);
    }
    var first = null;
    nodes.forEach(function (node) {
      var text = node.data, last = 0, frag = document.createDocumentFragment(), m;
      pattern.lastIndex = 0;
      while ((m = pattern.exec(text))) {
        frag.appendChild(document.createTextNode(text.slice(last, m.index)));
        var mark = document.createElement("mark"); mark.className = "search-hit"; mark.textContent = m[0];
        frag.appendChild(mark); first = first || mark; last = m.index + m[0].length;
      }
      if (last) { frag.appendChild(document.createTextNode(text.slice(last))); node.parentNode.replaceChild(frag, node); }
    });
    if (first && !id) first.scrollIntoView({ block: "center" });
  }
  markQuery();
})();
