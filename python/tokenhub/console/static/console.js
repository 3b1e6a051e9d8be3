// tokenhub console: optional live refresh. Every page works without this file.
// Elements with an id and data-refresh="<seconds>" (at least 5) are refreshed in place: while
// the tab is visible, the page's own URL is fetched again (one fetch for all of them, at the
// shortest interval asked) and each element's contents replaced by those of the element with
// the same id in the fresh page. A failed fetch leaves the old contents.
(function () {
  "use strict";
  function tick(els) {
    if (document.hidden) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Refresh": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        els.forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) el.replaceChildren.apply(el, Array.from(fresh.childNodes));
        });
      })
      .catch(function () {});
  }
  document.addEventListener("DOMContentLoaded", function () {
    var els = Array.from(document.querySelectorAll("[data-refresh][id]"));
    if (!els.length) return;
    var s = Math.min.apply(null, els.map(function (el) {
      return Math.max(5, parseInt(el.getAttribute("data-refresh"), 10) || 30);
    }));
    window.setInterval(function () { tick(els); }, s * 1000);
  });
})();
