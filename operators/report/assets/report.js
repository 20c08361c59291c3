// imgcurate run report: draws the plots of the page from the JSON in #report-data with Plotly
// (inlined gzip-compressed in #plotly-gz and unpacked here). window.__report.ready turns true when
// every plot is drawn; errors are shown in #status (and thrown, so a browser console sees them).
(function () {
  "use strict";
  const R = JSON.parse(document.getElementById("report-data").textContent);
  const state = { ready: false, errors: [], treemapRoot: "root", overlays: 0 };
  window.__report = state;
  const status = document.getElementById("status");
  const config = { displaylogo: false, responsive: true };

  async function loadPlotly() {
    const b64 = document.getElementById("plotly-gz").textContent.trim();
    const bin = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([bin]).stream().pipeThrough(new DecompressionStream("gzip"));
    const code = await new Response(stream).text();
    const s = document.createElement("script");
    s.textContent = code;
    document.head.appendChild(s);
    if (!window.Plotly) throw new Error("plotly.js did not load");
  }

  const short = (k) => k.split("/").slice(2).join("/") || k;

  function drawFunnel() {
    const F = R.funnel;
    const y = F.map((f) => f.phase_name + " · " + f.stage);
    const traces = [{
      type: "bar", orientation: "h", name: "continues", y: y, x: F.map((f) => f.leaving),
      marker: { color: "#2e7d32" }, hovertemplate: "%{y}: %{x:,} continue<extra></extra>",
    }];
    const keys = [];
    F.forEach((f) => Object.keys(f.dropped).forEach((k) => { if (!keys.includes(k)) keys.push(k); }));
    // Drop reasons in colours that are not the green of "continues".
    const palette = ["#c62828", "#ef6c00", "#f9a825", "#6a1b9a", "#1565c0", "#ad1457", "#4e342e", "#00838f",
                     "#8e24aa", "#d84315", "#283593", "#9e9d24", "#5d4037", "#00695c", "#e91e63", "#546e7a"];
    keys.forEach((k, i) => traces.push({
      type: "bar", orientation: "h", name: short(k), y: y, marker: { color: palette[i % palette.length] },
      x: F.map((f) => f.dropped[k] || 0), hovertemplate: "%{y}: %{x:,} " + k + "<extra></extra>",
    }));
    Plotly.newPlot("funnel-plot", traces, {
      barmode: "stack", height: 90 + 34 * F.length, margin: { l: 220, r: 20, t: 10, b: 40 },
      yaxis: { autorange: "reversed" }, xaxis: { title: { text: "samples" } },
      legend: { orientation: "v", font: { size: 11 } },
    }, config);
  }

  function drawHistograms() {
    R.histograms.forEach((h) => {
      const w = h.edges[1] - h.edges[0];
      const x = h.edges.slice(0, -1).map((e) => e + w / 2);
      const traces = [["kept", "#2e7d32"], ["dropped", "#c62828"]].filter(([p]) => h.counts[p]).map(([p, c]) => ({
        type: "bar", name: p + " (" + (h.n[p] || 0).toLocaleString() + ")", x: x, y: h.counts[p], width: w,
        marker: { color: c }, hovertemplate: "%{x:.4g}: %{y:,} " + p + "<extra></extra>",
      }));
      const shapes = [], annotations = [];
      h.thresholds.forEach((t, i) => {
        shapes.push({ type: "line", x0: t.value, x1: t.value, yref: "paper", y0: 0, y1: 1,
                      line: { color: "#111", dash: "dash", width: 1.5 } });
        annotations.push({ x: t.value, yref: "paper", y: 1 - 0.09 * i, text: t.label + " = " + t.value.toPrecision(4),
                           showarrow: false, xanchor: "left", font: { size: 10 }, bgcolor: "rgba(255,255,255,.8)" });
      });
      Plotly.newPlot("hist-" + h.column, traces, {
        barmode: "stack", title: { text: h.column, font: { size: 14 } }, height: 300,
        margin: { l: 50, r: 10, t: 36, b: 36 }, shapes: shapes, annotations: annotations, bargap: 0,
        legend: { orientation: "h", y: -0.2 },
      }, config);
    });
  }

  function drawStats() {
    const S = R.stats || [];
    if (!S.length) { document.getElementById("stats-plot").remove(); return; }
    Plotly.newPlot("stats-plot", [{
      type: "bar", orientation: "h", y: S.map((s) => s.operator), x: S.map((s) => s.wall_s),
      text: S.map((s) => s.rows_per_s.toFixed(1) + " rows/s"), textposition: "auto",
      hovertemplate: "%{y}: %{x:.2f} s<extra></extra>", marker: { color: "#1565c0" },
    }], { height: 80 + 30 * S.length, margin: { l: 320, r: 20, t: 10, b: 40 }, yaxis: { autorange: "reversed" },
          xaxis: { title: { text: "wall seconds (summed over waves)" } } }, config);
  }

  // --- the explorer -------------------------------------------------------------------------------
  function drawExplorer() {
    const E = R.explorer;
    if (!E) return;
    const gd = document.getElementById("treemap");
    Plotly.newPlot(gd, [{
      type: "treemap", ids: E.ids, labels: E.labels, parents: E.parents, values: E.values,
      branchvalues: "total", maxdepth: 2, customdata: E.mix,
      marker: { colors: E.kept, colorscale: [[0, "#c62828"], [0.5, "#fdd835"], [1, "#2e7d32"]], cmin: 0, cmax: 1, showscale: true,
                colorbar: { title: { text: "kept" }, thickness: 12 } },
      textinfo: "label", hovertemplate: "%{label}<br>%{customdata}<extra></extra>",
      pathbar: { visible: true }, tiling: { pad: 2 },
    }], { height: 640, margin: { l: 0, r: 0, t: 30, b: 0 } }, config);
    gd.on("plotly_treemapclick", (ev) => {
      const pt = ev.points && ev.points[0];
      if (pt) {
        // A click on the current root (or the path bar) zooms out to its parent.
        const id = pt.id;
        state.treemapRoot = id === state.treemapRoot ? (E.parents[E.ids.indexOf(id)] || "root") : id;
        showDetail(state.treemapRoot);
      }
      setTimeout(overlay, 900);  // after Plotly's zoom transition
    });
    gd.on("plotly_afterplot", () => setTimeout(overlay, 50));
    overlay();
    showDetail("root");
  }

  function nodeId(el) {
    const d = el.__data__;
    if (!d) return null;
    const node = d.data && d.data.data ? d.data.data : d.data;
    return node && node.id !== undefined ? node.id : null;
  }

  // Thumbnails on the visible cells: Plotly draws the treemap, these sit over its cells.
  function overlay() {
    const E = R.explorer, gd = document.getElementById("treemap"), layer = document.getElementById("treemap-thumbs");
    if (!E || !gd) return;
    layer.innerHTML = "";
    const box = gd.getBoundingClientRect();
    let n = 0;
    gd.querySelectorAll("g.slice").forEach((g) => {
      const id = nodeId(g);
      const surface = g.querySelector("path.surface");
      if (id === null || !surface || id === state.treemapRoot) return;
      const r = surface.getBoundingClientRect();
      const reps = E.reps[id] || [];
      const size = Math.min(64, Math.floor((r.height - 22) * 0.9), Math.floor((r.width - 8) / Math.max(1, reps.length)));
      if (size < 24 || !reps.length) return;
      const div = document.createElement("div");
      div.className = "cell-thumbs";
      div.dataset.cell = id;
      div.style.left = (r.left - box.left + 4) + "px";
      div.style.top = (r.top - box.top + 20) + "px";
      reps.forEach((t) => {
        const img = document.createElement("img");
        img.src = E.thumbs[t]; img.width = size; img.height = size; img.style.objectFit = "cover";
        div.appendChild(img);
      });
      layer.appendChild(div);
      n += 1;
    });
    state.overlays = n;
  }

  function showDetail(id) {
    const E = R.explorer, i = E.ids.indexOf(id), el = document.getElementById("cell-detail");
    if (i < 0) return;
    const imgs = (E.reps[id] || []).map((t) => '<img src="' + E.thumbs[t] + '" title="' + E.thumb_info[t]
      .replace(/&/g, "&amp;").replace(/"/g, "&quot;").replace(/</g, "&lt;") + '">').join("");
    el.innerHTML = "<h3>" + E.labels[i].replace(/</g, "&lt;") + "</h3><p>" + E.mix[i].replace(/</g, "&lt;") +
      '</p><div class="thumbs">' + imgs + "</div>";
    el.dataset.cell = id;
  }

  (async function main() {
    try {
      await loadPlotly();
      drawFunnel();
      drawHistograms();
      drawStats();
      drawExplorer();
      status.textContent = "";
      status.style.display = "none";
      state.ready = true;
    } catch (e) {
      state.errors.push(String(e));
      status.textContent = "The plots could not be drawn: " + e;
      status.className = "status error";
      throw e;
    }
  })();
})();
