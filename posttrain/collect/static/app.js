// posttrain collect: keyboard shortcuts, time per item, and a draft kept across reloads.
// Everything here is an extra: the forms post without it.
(function () {
  "use strict";
  var vote = document.getElementById("vote");
  var started = Date.now();
  var typing = function (el) {
    return el && (el.tagName === "TEXTAREA" || el.tagName === "SELECT" ||
      (el.tagName === "INPUT" && (el.type === "text" || el.type === "password")));
  };
  var pick = function (name, value) {
    var el = document.querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (el) { el.checked = true; el.dispatchEvent(new Event("change", { bubbles: true })); }
  };
  var scale = { "1": ["left", "2"], "2": ["left", "1"], "3": ["tie", null], "4": ["right", "1"], "5": ["right", "2"] };
  document.addEventListener("keydown", function (e) {
    if (typing(document.activeElement) || e.ctrlKey || e.metaKey || e.altKey) { return; }
    var next = document.getElementById("next");
    if (!vote) { if (next && e.key === "n") { next.requestSubmit(); } return; }
    var keyed = vote.querySelector('input[data-key="' + e.key + '"]');
    if (keyed) { keyed.checked = true; keyed.dispatchEvent(new Event("change", { bubbles: true })); e.preventDefault(); return; }
    if (scale[e.key]) {
      pick("choice", scale[e.key][0]);
      if (scale[e.key][1]) { pick("strength", scale[e.key][1]); }
      e.preventDefault();
      return;
    }
    if (e.key === "Enter") { e.preventDefault(); vote.requestSubmit(); }
  });
  if (!vote) { return; }
  // a draft of this item's form survives a reload (sessionStorage: this tab only)
  var key = "collect-draft-" + vote.dataset.assignment;
  var save = function () {
    var draft = {};
    Array.prototype.forEach.call(vote.elements, function (el) {
      if (!el.name || el.type === "hidden") { return; }
      if (el.type === "radio" || el.type === "checkbox") { if (el.checked) { draft[el.name + "=" + el.value] = true; } }
      else { draft[el.name] = el.value; }
    });
    draft._elapsed = Date.now() - started;
    try { sessionStorage.setItem(key, JSON.stringify(draft)); } catch (err) { /* storage off: no draft */ }
  };
  try {
    var draft = JSON.parse(sessionStorage.getItem(key) || "null");
    if (draft) {
      Array.prototype.forEach.call(vote.elements, function (el) {
        if (!el.name || el.type === "hidden") { return; }
        if (el.type === "radio" || el.type === "checkbox") { el.checked = !!draft[el.name + "=" + el.value]; }
        else if (el.name in draft) { el.value = draft[el.name]; }
      });
      started -= draft._elapsed || 0;
    }
  } catch (err) { /* a broken draft is ignored */ }
  vote.addEventListener("change", save);
  vote.addEventListener("input", save);
  window.addEventListener("pagehide", save);
  vote.addEventListener("submit", function () {
    vote.elements.duration_ms.value = String(Date.now() - started);
    try { sessionStorage.removeItem(key); } catch (err) { /* nothing to remove */ }
  });
})();
