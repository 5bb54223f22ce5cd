// Attention, Annotated: theme toggle, copy buttons and search. No network: the search index is a script.
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

  // Search: every term must appear; a match in the title or heading ranks first.
  var input = document.getElementById("search-box");
  var list = document.getElementById("search-results");
  var index = window.SEARCH_INDEX || [];
  var prepared = index.map(function (e) {
    return { e: e, head: (e.t + " " + e.h).toLowerCase(), body: (e.x || "").toLowerCase() };
  });
  function snippet(text, term) {
    var i = text.toLowerCase().indexOf(term);
    if (i < 0) return text.slice(0, 120);
    var s = Math.max(0, i - 40);
    return (s ? "…" : "") + text.slice(s, s + 120);
  }
  function search(q) {
    var terms = q.toLowerCase().split(/\s+/).filter(Boolean);
    if (!terms.length) return [];
    var hits = [];
    prepared.forEach(function (p) {
      var score = 0;
      for (var i = 0; i < terms.length; i++) {
        var inHead = p.head.indexOf(terms[i]) >= 0, inBody = p.body.indexOf(terms[i]) >= 0;
        if (!inHead && !inBody) return;
        score += inHead ? 3 : 1;
      }
      hits.push({ p: p, score: score });
    });
    hits.sort(function (a, b) { return b.score - a.score; });
    return hits.slice(0, 15).map(function (h) { return { e: h.p.e, term: terms[0] }; });
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
      a.href = h.e.u;
      var t = document.createElement("span"); t.className = "r-title"; t.textContent = h.e.h || h.e.t;
      var w = document.createElement("span"); w.className = "r-where"; w.textContent = "  " + h.e.t;
      var x = document.createElement("span"); x.className = "r-text"; x.textContent = snippet(h.e.x || "", h.term);
      a.appendChild(t); a.appendChild(w); a.appendChild(x); li.appendChild(a); list.appendChild(li);
    });
    list.hidden = false;
  }
  if (input && list) {
    input.addEventListener("input", function () { render(input.value); });
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
})();
