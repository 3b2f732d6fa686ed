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
  // The action panel (a confirmation, a result, a refusal) replaces the button pressed in it: the
  // keyboard focus would fall back to the page's body, and the next Tab start again at the top. It
  // goes to the new panel instead, and after Cancel back to the button that asked.
  var opener = null;
  document.addEventListener("htmx:beforeRequest", function (event) {
    var target = event.detail.target, active = document.activeElement;
    if (target && target.id === "action-panel" && active && active !== document.body && !target.contains(active)) {
      opener = active;
    }
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail.target;
    if (!target || target.id !== "action-panel") return;
    var panel = target.querySelector(".panel");
    if (panel) {
      panel.setAttribute("tabindex", "-1");
      panel.focus();
    } else if (opener && document.contains(opener)) {
      opener.focus();
    }
  });
  document.addEventListener("htmx:sendError", serverLost);
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.xhr && event.detail.xhr.status) serverBack();
  });
})();
