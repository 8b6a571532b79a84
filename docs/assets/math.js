// Render the maths of every page with the KaTeX copy served from this site (no network needed).
// pymdownx.arithmatex (generic mode) wraps inline maths as <span class="arithmatex">\(...\)</span>
// and display maths as <div class="arithmatex">\[...\]</div>.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".arithmatex").forEach(function (el) {
    var tex = el.textContent.trim();
    var display = tex.startsWith("\\[");
    if (tex.startsWith("\\(") || display) {
      tex = tex.slice(2, -2);
    }
    katex.render(tex, el, { displayMode: display, throwOnError: false });
  });
});
