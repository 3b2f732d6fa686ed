// auditctl dashboard: the few lines htmx does not do. No inline script is allowed (CSP).
(function () {
  "use strict";
  // The database banner comes from the server. When the dashboard server itself cannot be
  // reached, no response arrives at all: say so here, and take it away on the next answer.
  var banner = null;
  function serverLost() {
    if (banner) return;
    banner = document.createElement("div");
    banner.className = "banner";
    banner.id = "server-banner";
    banner.setAttribute("role", "alert");
    banner.textContent = "The dashboard server is not answering. Retrying; this page updates by itself when it is back.";
    var main = document.querySelector("main");
    main.insertBefore(banner, main.firstChild);
  }
  function serverBack() {
    if (banner) { banner.remove(); banner = null; }
  }
  document.addEventListener("htmx:sendError", serverLost);
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.xhr && event.detail.xhr.status) serverBack();
  });
})();
