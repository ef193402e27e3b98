// ModelPort's small page script: upload progress and drag-and-drop, copy buttons,
// confirmations. Pages work without it; it only adds to them.
(function () {
  "use strict";

  function onReady(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  // Copy buttons: <button data-copy-target="#id">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy-target"));
    if (!source) return;
    var text = source.innerText.trim();
    var done = function () {
      button.classList.add("copied");
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; button.classList.remove("copied"); }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(source); });
    } else {
      selectText(source);
      try { document.execCommand("copy"); done(); } catch (e) { /* the text stays selected */ }
    }
  });

  function selectText(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  // Forms with data-confirm ask first.
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  }, true);

  onReady(function () {
    var form = document.querySelector("form[data-upload]");
    if (!form) return;
    var zone = form.querySelector("[data-dropzone]");
    var input = zone.querySelector("input[type=file]");
    var info = zone.querySelector("[data-file-info]");
    var progress = form.querySelector("[data-progress]");
    var bar = progress.querySelector("progress");
    var text = progress.querySelector("[data-progress-text]");
    var error = form.querySelector("[data-upload-error]");

    function describe() {
      if (input.files.length) {
        var file = input.files[0];
        info.textContent = file.name + " · " + formatSize(file.size);
      }
    }
    input.addEventListener("change", describe);
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("dragging"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.remove("dragging"); });
    });
    zone.addEventListener("drop", function (event) {
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        describe();
      }
    });

    form.addEventListener("submit", function (event) {
      if (!window.FormData || !window.XMLHttpRequest) return;
      event.preventDefault();
      error.hidden = true;
      var submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      progress.hidden = false;
      var request = new XMLHttpRequest();
      request.open("POST", form.action || window.location.href);
      request.setRequestHeader("X-Requested-With", "XMLHttpRequest");
      request.upload.addEventListener("progress", function (e) {
        if (!e.lengthComputable) return;
        var percent = Math.round((e.loaded / e.total) * 100);
        bar.value = percent;
        text.textContent = percent + "% · " + formatSize(e.loaded) + " of " + formatSize(e.total);
      });
      request.addEventListener("load", function () {
        var body = {};
        try { body = JSON.parse(request.responseText); } catch (e) { body = {}; }
        if (request.status >= 200 && request.status < 300 && body.redirect) {
          bar.value = 100;
          text.textContent = "Uploaded, starting the pipeline…";
          window.location.assign(body.redirect);
          return;
        }
        fail(body.error || ("The upload failed (HTTP " + request.status + ")."));
      });
      request.addEventListener("error", function () { fail("The connection broke during the upload. Try again."); });
      request.send(new FormData(form));

      function fail(message) {
        error.textContent = message;
        error.hidden = false;
        progress.hidden = true;
        submit.disabled = false;
      }
    });
  });

  function formatSize(bytes) {
    var units = ["bytes", "KB", "MB", "GB"];
    var value = bytes, unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return (unit === 0 ? value : value.toFixed(1)) + " " + units[unit];
  }
})();

// Tabs: [data-tabs] with role=tab buttons; all panels stay visible without JavaScript.
(function () {
  "use strict";
  function setup(root) {
    if (root.classList.contains("ready")) return;
    var tabs = Array.prototype.slice.call(root.querySelectorAll('[role="tab"]'));
    function select(tab) {
      tabs.forEach(function (other) {
        var selected = other === tab;
        other.setAttribute("aria-selected", selected ? "true" : "false");
        other.tabIndex = selected ? 0 : -1;
        document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
      });
    }
    tabs.forEach(function (tab, index) {
      tab.addEventListener("click", function () { select(tab); });
      tab.addEventListener("keydown", function (event) {
        var step = event.key === "ArrowRight" ? 1 : event.key === "ArrowLeft" ? -1 : 0;
        if (!step) return;
        var next = tabs[(index + step + tabs.length) % tabs.length];
        select(next);
        next.focus();
      });
    });
    select(tabs[0]);
    root.classList.add("ready");
  }
  function all() { document.querySelectorAll("[data-tabs]").forEach(setup); }
  if (document.readyState !== "loading") all(); else document.addEventListener("DOMContentLoaded", all);
  document.addEventListener("htmx:afterSwap", all);
})();
