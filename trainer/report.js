// The dashboard's line charts made interactive (trainer/report.py inlines this file into the page).
// Each line chart's <svg> has a <script type="application/json" data-for=ID> beside it holding its
// data (trainer/report_svg.py: chart_data); the contents of its <g class="plot"> are redrawn from
// that data: hover shows a cursor and every line's value at the nearest step, a drag zooms the
// step range (y refits to what is visible), a double-click resets, the smoothing slider draws an
// EMA over each per-step line with the raw line faint behind it. Without script the static SVG
// stays. Loaded with #selftest, the page exercises all of this with synthetic events and writes
// the results into <body data-selftest> (tests/test_report.py reads them with --dump-dom).
// An expert-load heatmap (trainer/report_moe.py) gets a slider over the logged steps, whose shares
// sit in its JSON; #selftest moves it to the first step and back (<body data-selftest-experts>).
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const SELFTEST = location.hash === "#selftest";
  const STORE = "trainer.report";  // smoothing, zoom and hidden lines survive a --refresh reload
  const saved = load();
  const charts = [], experts = [];
  let smoothing = saved.smoothing || 0;

  // -- numbers and ticks (as trainer/report_svg.py: short, linear_ticks, log_ticks, padded) --------

  function precise(v, digits) {
    return String(Number(v.toPrecision(digits)));
  }

  function short(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return precise(v / 1e9, 3) + "G";
    if (a >= 1e6) return precise(v / 1e6, 3) + "M";
    if (a >= 1e4) return precise(v / 1e3, 3) + "k";
    if (a > 0 && a < 1e-3) return v.toExponential(0).replace(/e([+-])(\d)$/, "e$10$2");
    return precise(v, 4);
  }

  function value(v) {  // a tooltip's value: 4 significant digits, or "nan" / "inf" as logged
    if (typeof v !== "number") return v;
    return Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toPrecision(4) : precise(v, 4);
  }

  function linearTicks(lo, hi, count) {
    const raw = (hi - lo) / count, magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    const first = Math.ceil(lo / step) * step, ticks = [];
    for (let i = 0; i < Math.floor((hi - first) / step + 1e-9) + 1; i++) ticks.push(first + i * step);
    return ticks;
  }

  function logTicks(lo, hi) {
    const decades = [];
    for (let d = Math.ceil(lo); d <= Math.floor(hi); d++) decades.push(d);
    if (decades.length >= 3) {
      const every = Math.ceil(decades.length / 6);
      return decades.filter((_, i) => i % every === 0).map((d) => Math.pow(10, d));
    }
    const ticks = [];
    for (let d = Math.floor(lo); d <= Math.ceil(hi); d++) {
      for (const m of [1, 2, 5]) {
        const t = m * Math.pow(10, d);
        if (lo <= Math.log10(t) && Math.log10(t) <= hi) ticks.push(t);
      }
    }
    return ticks.length >= 2 ? ticks : linearTicks(Math.pow(10, lo), Math.pow(10, hi), 6);
  }

  function padded(lo, hi, fraction) {
    const pad = hi - lo > 1e-12 * Math.max(1, Math.abs(hi)) ? (hi - lo) * fraction : 0.1 * Math.abs(hi) || 0.5;
    return [lo - pad, hi + pad];
  }

  function ema(ys, weight) {  // TensorBoard's debiased EMA; a NaN / inf keeps its place, skipped
    let last = 0, n = 0;
    return ys.map((y) => {
      if (typeof y !== "number") return y;
      last = last * weight + (1 - weight) * y;
      n += 1;
      return last / (1 - Math.pow(weight, n));
    });
  }

  function nearest(xs, x) {  // the index of the element of sorted XS closest to X
    let lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (xs[mid] <= x) lo = mid; else hi = mid;
    }
    return Math.abs(xs[hi] - x) < Math.abs(xs[lo] - x) ? hi : lo;
  }

  function make(parent, name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const key in attrs) if (attrs[key] !== "" && attrs[key] !== undefined) node.setAttribute(key, attrs[key]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function load() {
    if (SELFTEST) return {};
    try { return JSON.parse(sessionStorage.getItem(STORE)) || {}; } catch (e) { return {}; }
  }

  function save() {
    if (SELFTEST) return;
    const state = {smoothing: smoothing, views: {}, hidden: {}};
    for (const c of charts) {
      if (c.zoomed) state.views[c.id] = [c.view.x0, c.view.x1];
      state.hidden[c.id] = Array.from(c.hidden);
    }
    try { sessionStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { /* storage off: forget */ }
  }

  // -- one line chart ------------------------------------------------------------------------------

  function LineChart(svg, data) {
    const f = data.frame, plot = svg.querySelector("g.plot"), full = {x0: f.x0, x1: f.x1};
    const c = {id: svg.id, svg: svg, data: data, hidden: new Set((saved.hidden || {})[svg.id] || [])};
    const view = (saved.views || {})[svg.id];
    c.view = view ? {x0: view[0], x1: view[1]} : Object.assign({}, full);
    c.zoomed = Boolean(view);
    const area = {x: f.left, y: f.top, width: f.width, height: f.height}, clip = "clip-" + svg.id;
    make(make(make(svg, "defs", {}), "clipPath", {id: clip}), "rect", area);
    const overlay = make(svg, "g", {"pointer-events": "none", "font-family": "system-ui, sans-serif", "font-size": 11});
    const cursor = make(overlay, "g", {display: "none"});
    const band = make(overlay, "rect", {y: f.top, height: f.height, fill: "#4a90d9", opacity: 0.15, display: "none"});
    const hit = make(svg, "rect", Object.assign({class: "hit", fill: "transparent"}, area));  // takes the mouse

    c.X = (x) => f.left + (x - c.view.x0) / (c.view.x1 - c.view.x0) * f.width;
    c.Y = (y) => f.top + (c.y1 - (data.log ? Math.log10(y) : y)) / (c.y1 - c.y0) * f.height;
    c.step = (px) => c.view.x0 + (px - f.left) / f.width * (c.view.x1 - c.view.x0);
    c.shows = (y) => typeof y === "number" && (y > 0 || !data.log);
    c.lines = () => data.lines.filter((line) => !c.hidden.has(line.label));
    c.smoothed = (line) => (smoothing > 0 && line.smooth ? ema(line.y, smoothing) : line.y);
    const inView = (x) => x >= c.view.x0 && x <= c.view.x1;

    function fit() {  // y fits what is drawn of the visible lines and references (y0, y1: log10 on a log axis)
      const values = [], shown = (y) => (c.shows(y) ? (data.log ? Math.log10(y) : y) : null);
      for (const line of c.lines()) {
        const xs = line.x, ys = line.y.map(shown);
        for (let i = 0; i < xs.length; i++) {
          if (ys[i] === null) continue;
          if (inView(xs[i])) values.push(ys[i]);
          for (const edge of [c.view.x0, c.view.x1]) {  // where the segment to the next point leaves the view
            if (ys[i + 1] != null && (xs[i] - edge) * (xs[i + 1] - edge) < 0) {
              values.push(ys[i] + (ys[i + 1] - ys[i]) * (edge - xs[i]) / (xs[i + 1] - xs[i]));
            }
          }
        }
      }
      for (const ref of data.refs) if (!c.hidden.has(ref.label) && shown(ref.y) !== null) values.push(shown(ref.y));
      if (!values.length) values.push(data.log ? 0 : 1);  // only NaN / inf: an axis (around 1) for their crosses
      [c.y0, c.y1] = padded(values.reduce((a, b) => Math.min(a, b)), values.reduce((a, b) => Math.max(a, b)), 0.05);
    }

    function pathD(xs, ys) {  // the points in view and one beyond each end; a value not shown breaks the line
      const d = [], first = Math.max(0, nearest(xs, c.view.x0) - 1);
      const last = Math.min(xs.length - 1, nearest(xs, c.view.x1) + 1);
      let pen = false;
      for (let i = first; i <= last; i++) {
        if (c.shows(ys[i])) d.push((pen ? "L" : "M") + c.X(xs[i]).toFixed(1) + "," + c.Y(ys[i]).toFixed(1));
        pen = c.shows(ys[i]);
      }
      return d.join("");
    }

    function drawLine(parent, line) {  // raw (faint when smoothed), smoothed, dots, crosses for NaN / inf
      const g = make(parent, "g", {"data-series": line.label}), smooth = smoothing > 0 && line.smooth;
      const style = {fill: "none", stroke: line.color, "stroke-dasharray": line.dash};
      make(g, "path", Object.assign({d: pathD(line.x, line.y), class: smooth ? "raw" : "line"}, style,
                                    smooth ? {"stroke-width": 1, opacity: 0.25} : {"stroke-width": 1.6}));
      if (smooth) {
        const d = pathD(line.x, c.smoothed(line));
        make(g, "path", Object.assign({d: d, class: "smoothed", "stroke-width": 1.8}, style));
      }
      line.x.forEach((x, i) => {
        if (!inView(x)) return;
        if (line.dots && c.shows(line.y[i])) {
          make(g, "circle", {cx: c.X(x), cy: c.Y(line.y[i]), r: 2.5, fill: line.color});
        }
        if (typeof line.y[i] !== "number") {  // NaN / inf logged: a red cross at the bottom
          make(g, "text", {x: c.X(x), y: f.top + f.height - 4, fill: "#c00", "text-anchor": "middle"}, "×");
        }
      });
    }

    c.draw = function () {  // the plot rectangle's contents for the current view, smoothing and hidden lines
      fit();
      plot.textContent = "";
      const bottom = f.top + f.height;
      for (const t of linearTicks(c.view.x0, c.view.x1, 6).filter(Number.isInteger)) {  // steps are whole
        make(plot, "line", {x1: c.X(t), x2: c.X(t), y1: f.top, y2: bottom, stroke: "#eee"});
        make(plot, "text", {x: c.X(t), y: bottom + 14, "text-anchor": "middle", class: "tick-x"}, short(t));
      }
      for (const t of data.log ? logTicks(c.y0, c.y1) : linearTicks(c.y0, c.y1, 5)) {
        make(plot, "line", {x1: f.left, x2: f.left + f.width, y1: c.Y(t), y2: c.Y(t), stroke: "#eee"});
        make(plot, "text", {x: f.left - 5, y: c.Y(t) + 4, "text-anchor": "end", class: "tick-y"}, short(t));
      }
      const inside = make(plot, "g", {"clip-path": "url(#" + clip + ")"});
      for (const ref of data.refs) {
        if (c.hidden.has(ref.label) || !c.shows(ref.y)) continue;
        make(make(inside, "g", {"data-series": ref.label}), "line", {x1: f.left, x2: f.left + f.width, y1: c.Y(ref.y),
          y2: c.Y(ref.y), stroke: ref.color, "stroke-width": 1.6, "stroke-dasharray": ref.dash});
      }
      for (const line of c.lines()) drawLine(inside, line);
      for (const m of data.marks) {  // a loss spike's glyph above the plot, a grad-norm spike's just inside it
        if (!inView(m.step) || c.hidden.has(m.label)) continue;
        const g = make(plot, "g", {class: "spike", "data-kind": m.kind, "data-step": m.step}), x = c.X(m.step);
        const dashed = {stroke: m.color, "stroke-dasharray": "3,3", opacity: 0.7};
        make(g, "line", Object.assign({x1: x, x2: x, y1: f.top, y2: bottom}, dashed));
        const y = m.kind === "loss" ? f.top - 3 : f.top + 10;
        make(g, "text", {x: x, y: y, fill: m.color, "text-anchor": "middle"}, m.glyph);
      }
      if (c.hoverStep !== undefined) c.hover(c.hoverStep);
    };

    c.hover = function (step) {  // the cursor at the logged step nearest STEP; a row of text per line
      c.hoverStep = step;
      cursor.textContent = "";
      const near = c.lines().filter((l) => l.x.length).map((l) => l.x[nearest(l.x, step)]).filter(inView);
      if (!near.length) return cursor.setAttribute("display", "none");
      const at = near.reduce((a, b) => (Math.abs(b - step) < Math.abs(a - step) ? b : a)), x = c.X(at);
      make(cursor, "line", {x1: x, x2: x, y1: f.top, y2: f.top + f.height, stroke: "#555", class: "cursor"});
      const rows = [["#000", "step " + (Number.isInteger(at) ? at : precise(at, 6))]];
      for (const line of c.lines()) {
        const i = line.x.length ? nearest(line.x, at) : -1, shown = c.smoothed(line)[i];
        if (i < 0 || !inView(line.x[i])) continue;
        let text = line.label + ": " + value(shown);
        if (value(shown) !== value(line.y[i])) text += " (raw " + value(line.y[i]) + ")";
        if (line.x[i] !== at) text += " @ " + line.x[i];  // this line's nearest logged step
        rows.push([line.color, text]);
        if (c.shows(shown)) {
          make(cursor, "circle", {cx: c.X(line.x[i]), cy: c.Y(shown), r: 3.5, fill: line.color, stroke: "#fff"});
        }
      }
      for (const m of data.marks) {  // a spike at this step
        if (m.step === at && !c.hidden.has(m.label)) rows.push([m.color, m.glyph + " " + m.title]);
      }
      const tip = make(cursor, "g", {class: "tooltip"});
      const box = make(tip, "rect", {fill: "#fff", stroke: "#bbb", rx: 3, opacity: 0.95});
      let width = 0;
      rows.forEach(([color, text], i) => {
        const t = make(tip, "text", {x: 8, y: 15 + 14 * i, fill: i ? "#333" : "#000", "font-weight": i ? 400 : 600});
        if (i) make(t, "tspan", {fill: color}, "■ ");
        make(t, "tspan", {}, text);
        width = Math.max(width, t.getComputedTextLength());
      });
      box.setAttribute("width", width + 16);
      box.setAttribute("height", 14 * rows.length + 8);
      const left = x + 12 + width + 16 <= svg.viewBox.baseVal.width ? x + 12 : x - 28 - width;  // right if it fits
      tip.setAttribute("transform", "translate(" + left + " " + (f.top + 4) + ")");
      cursor.setAttribute("display", "inline");
    };

    c.unhover = function () {
      c.hoverStep = undefined;
      cursor.setAttribute("display", "none");
    };

    c.zoom = function (a, b) {  // to steps [a, b]; nothing for a range under a step
      if (Math.abs(b - a) < 1) return;
      c.view = {x0: Math.min(a, b), x1: Math.max(a, b)};
      c.zoomed = true;
      c.draw();
      save();
    };

    c.reset = function () {
      c.view = Object.assign({}, full);
      c.zoomed = false;
      c.draw();
      save();
    };

    // The mouse in the SVG's own units (the figure may be drawn scaled), held inside the plot.
    const local = (e) => {
      const x = new DOMPoint(e.clientX, e.clientY).matrixTransform(svg.getScreenCTM().inverse()).x;
      return Math.min(Math.max(x, f.left), f.left + f.width);
    };
    let dragFrom = null;
    hit.addEventListener("mousedown", (e) => {
      if (e.button !== 0) return;
      dragFrom = local(e);
      e.preventDefault();  // no text selection while dragging
    });
    hit.addEventListener("mousemove", (e) => c.hover(c.step(local(e))));
    hit.addEventListener("mouseleave", c.unhover);
    window.addEventListener("mousemove", (e) => {  // the band follows a drag, also outside the plot
      if (dragFrom === null) return;
      const x = local(e);
      band.setAttribute("x", Math.min(dragFrom, x));
      band.setAttribute("width", Math.abs(x - dragFrom));
      band.setAttribute("display", Math.abs(x - dragFrom) > 3 ? "inline" : "none");
    });
    window.addEventListener("mouseup", (e) => {
      if (dragFrom === null) return;
      const x = local(e);
      band.setAttribute("display", "none");
      if (Math.abs(x - dragFrom) > 3) c.zoom(c.step(dragFrom), c.step(x));  // a click is no zoom
      dragFrom = null;
    });
    hit.addEventListener("dblclick", c.reset);
    svg.querySelectorAll(".legend").forEach((entry) => {  // a click hides or shows the line of that name
      if (c.hidden.has(entry.dataset.series)) entry.classList.add("off");
      entry.addEventListener("click", () => {
        const name = entry.dataset.series;
        if (!c.hidden.delete(name)) c.hidden.add(name);
        entry.classList.toggle("off", c.hidden.has(name));
        c.draw();
        save();
      });
    });
    c.draw();
    return c;
  }

  // -- an expert-load heatmap: a slider over the logged steps -------------------------------------

  function viridis(colors, t) {  // as trainer/report_svg.py's viridis: linear between the stops
    t = Math.min(Math.max(t, 0), 1) * (colors.length - 1);
    const i = Math.min(Math.floor(t), colors.length - 2), hex = (c, k) => parseInt(c.slice(1 + 2 * k, 3 + 2 * k), 16);
    return "#" + [0, 1, 2].map((k) => {
      const a = hex(colors[i], k), b = hex(colors[i + 1], k);
      return Math.round(a + (b - a) * (t - i)).toString(16).padStart(2, "0");
    }).join("");
  }

  function ExpertHeatmap(svg, data) {
    const rows = Array.from(svg.querySelectorAll("g.hm-row"), (g) => g.querySelectorAll("rect"));
    const label = svg.querySelector("text.expert-step"), last = data.steps.length - 1;
    const controls = document.createElement("div");
    controls.className = "expert-controls";
    controls.innerHTML = '<label>step <input type="range" min="0" step="1"></label>';
    const input = controls.querySelector("input");
    input.max = last;
    input.value = last;
    svg.after(controls);
    const c = {id: svg.id, svg: svg, data: data, input: input};
    c.show = function (i) {  // the shares logged at the i-th step: colours, values and hover text
      data.shares[i].forEach((shares, r) => shares.forEach((v, e) => {
        const cell = rows[r][e];
        cell.setAttribute("fill", viridis(data.colors, v / data.hi));
        cell.setAttribute("data-value", v);
        cell.querySelector("title").textContent = data.blocks[r] + " expert " + e + ": " + (100 * v).toFixed(2) + "%";
      }));
      label.textContent = "step " + data.steps[i];
      input.value = i;
    };
    input.addEventListener("input", () => c.show(Number(input.value)));
    controls.hidden = last === 0;  // one logged step: nothing to slide over
    return c;
  }

  // -- the page ------------------------------------------------------------------------------------

  document.querySelectorAll("script[type='application/json'][data-for]").forEach((block) => {
    const svg = document.getElementById(block.dataset.for);
    if (svg && svg.querySelector("g.plot")) charts.push(LineChart(svg, JSON.parse(block.textContent)));
    if (svg && svg.dataset.chart === "expert-heatmap") experts.push(ExpertHeatmap(svg, JSON.parse(block.textContent)));
  });
  const slider = document.getElementById("smoothing"), shown = document.getElementById("smoothing-value");
  function smooth(weight) {
    smoothing = weight;
    slider.value = weight;
    shown.textContent = weight.toFixed(2);
    charts.forEach((c) => c.draw());
    save();
  }
  slider.addEventListener("input", () => smooth(Number(slider.value)));
  if (smoothing) smooth(smoothing);
  document.querySelector(".controls").hidden = false;

  // Count the charts that drew something, for tests and for the curious.
  let drawn = 0;
  document.querySelectorAll("svg[data-chart]").forEach((svg) => {
    const box = svg.getBoundingClientRect();
    if (box.width > 0 && box.height > 0 && svg.querySelector("path[d^='M'], g.hm-row rect")) drawn++;
  });
  document.body.dataset.charts = document.querySelectorAll("svg[data-chart]").length;
  document.body.dataset.rendered = drawn;

  if (SELFTEST) selftest();
  if (SELFTEST) selftestExperts();

  // -- #selftest of the expert-load heatmaps: what the cells hold at the last step, the first, and back --

  function selftestExperts() {
    const cells = (c) => Array.from(c.svg.querySelectorAll("g.hm-row"), (g) => Array.from(g.querySelectorAll("rect"),
      (rect) => [Number(rect.getAttribute("data-value")), rect.getAttribute("fill"), rect.textContent]));
    const state = (c) => ({step: c.svg.querySelector("text.expert-step").textContent, value: Number(c.input.value),
                           cells: cells(c)});
    const results = {};
    for (const c of experts) {
      const r = (results[c.id] = {});
      try {
        const box = c.svg.getBoundingClientRect();
        r.size = [box.width, box.height];
        r.slider = !c.input.closest("[hidden]");
        r.last = state(c);
        c.input.value = 0;
        c.input.dispatchEvent(new Event("input"));
        r.first = state(c);
        c.input.value = c.input.max;
        c.input.dispatchEvent(new Event("input"));
        r.back = state(c);
      } catch (e) {
        r.error = String(e.stack || e);
      }
    }
    document.body.dataset.selftestExperts = JSON.stringify(results);
  }

  // -- #selftest: every line chart hovered, zoomed, smoothed and reset by synthetic mouse events ---

  function selftest() {
    function fire(c, type, step) {  // a mouse event at STEP, half-way up the plot, in screen pixels
      const f = c.data.frame, p = new DOMPoint(c.X(step), f.top + f.height / 2).matrixTransform(c.svg.getScreenCTM());
      c.svg.querySelector("rect.hit").dispatchEvent(
        new MouseEvent(type, {clientX: p.x, clientY: p.y, button: 0, bubbles: true, cancelable: true}));
    }
    function tooltip(c) {
      const tip = c.svg.querySelector("g.tooltip");
      const shown = tip && tip.closest("[display='inline']");
      return shown ? Array.from(tip.querySelectorAll("text"), (t) => t.textContent) : [];
    }
    function state(c) {
      const ticks = (cls) => Array.from(c.svg.querySelectorAll("g.plot text." + cls), (t) => t.textContent);
      const count = (selector) => c.svg.querySelectorAll("g.plot " + selector).length;
      return {x: [c.view.x0, c.view.x1], y: c.data.log ? [10 ** c.y0, 10 ** c.y1] : [c.y0, c.y1],
              x_ticks: ticks("tick-x"), y_ticks: ticks("tick-y"),
              paths: count("path[d^='M']"), raw: count("path.raw"), smoothed: count("path.smoothed")};
    }
    const results = {};
    for (const c of charts) {
      const r = (results[c.id] = {});
      try {
        const steps = Array.from(new Set([].concat(...c.data.lines.map((l) => l.x)))).sort((a, b) => a - b);
        const pick = (q) => steps[Math.floor(q * (steps.length - 1))];
        r.full = state(c);
        fire(c, "mousemove", pick(0.4));
        const cursor = Number(c.svg.querySelector("line.cursor").getAttribute("x1"));
        r.hover = {step: pick(0.4), lines: tooltip(c), cursor: cursor};
        const at = (q) => c.step(c.data.frame.left + q * c.data.frame.width);  // a fraction of the plot's width
        r.zoom = {from: at(0.5), to: at(0.9)};
        fire(c, "mousedown", r.zoom.from);
        fire(c, "mousemove", r.zoom.to);
        fire(c, "mouseup", r.zoom.to);
        Object.assign(r.zoom, state(c));
        fire(c, "mousemove", at(0.5));
        r.zoom.hover = tooltip(c);
        smooth(0.9);
        r.smooth = state(c);
        r.smooth.hover = tooltip(c);
        smooth(0);
        fire(c, "dblclick", pick(0.7));
        r.reset = state(c);
        const entry = c.svg.querySelector(".legend"), series = () => Array.from(
          c.svg.querySelectorAll("g.plot g[data-series]"), (g) => g.dataset.series);
        entry.dispatchEvent(new MouseEvent("click", {bubbles: true}));
        r.legend = {hidden: entry.dataset.series, series: series(), y: state(c).y};
        entry.dispatchEvent(new MouseEvent("click", {bubbles: true}));
        r.legend.again = series();
        fire(c, "mouseleave", pick(0.7));
        r.left = tooltip(c);
      } catch (e) {
        r.error = String(e.stack || e);
      }
    }
    document.body.dataset.selftest = JSON.stringify(results);
  }
})();
