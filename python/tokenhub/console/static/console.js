// tokenhub console: optional live refresh. Every page works without this file.
// An element with data-refresh="<seconds>" and an id is re-fetched from the same URL every
// <seconds> (at least 5) while the tab is visible, and its contents replaced by the element
// with the same id in the fresh page. A failed fetch leaves the old contents.
(function () {
  "use strict";
  function refresh(el) {
    if (document.hidden) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Refresh": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById(el.id);
        if (fresh) el.replaceChildren.apply(el, Array.from(fresh.childNodes));
      })
      .catch(function () {});
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh][id]").forEach(function (el) {
      var s = Math.max(5, parseInt(el.getAttribute("data-refresh"), 10) || 30);
      window.setInterval(function () { refresh(el); }, s * 1000);
    });
  });
})();
