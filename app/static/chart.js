// A small SVG line chart: one line per chain over the steps, no dependencies.

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#0f766e", "#2563eb", "#d97706", "#c026d3", "#dc2626", "#4f46e5", "#65a30d", "#0891b2",
  "#9333ea", "#ea580c", "#0d9488", "#be123c", "#1d4ed8", "#a16207", "#15803d", "#7c3aed"];
const BOX = { width: 420, height: 200, left: 46, right: 12, top: 12, bottom: 26 }; // the svg's viewBox and margins

export const color = (i) => COLORS[i % COLORS.length];

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceStep(span, count) {
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit >= 7.5 ? 10 : unit >= 3.5 ? 5 : unit >= 1.5 ? 2 : 1) * power; // the nearest: rounding up left one tick
}

function tickLabel(value, step) {
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  return value.toFixed(Math.min(digits, 4));
}

const finite = (v) => typeof v === "number" && Number.isFinite(v);

// Draws into `node` (an <svg>) one <polyline data-chain data-points> per unbroken run of a series' points, and a dot
// where such a run is a single point.
// series: one array per chain, indexed by step (missing or non-finite values are gaps). Options: steps (x runs 0..steps),
// highlight (a chain drawn on top, the others faded), heads (a dot at each line's latest point),
// marker ({chain, step}: a larger dot), empty (the text shown without data).
export function drawChart(node, series, { steps = 0, highlight = null, heads = false, marker = null, empty = "" } = {}) {
  node.replaceChildren();
  const { width, height, left, right, top, bottom } = BOX;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const values = series.flat().filter(finite);
  if (!values.length) {
    node.append(svg("rect", { x: left, y: top, width: plotW, height: plotH, fill: "none", class: "axis", "stroke-dasharray": "3 4" }));
    node.append(svg("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle", class: "empty" }, empty));
    return;
  }
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad;
  hi += pad;
  const xMax = Math.max(steps, ...series.map((line) => line.length - 1));
  const x = (step) => left + (xMax ? step / xMax : 0.5) * plotW; // a lone step 0 in the middle
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * plotH;

  const yStep = niceStep(hi - lo, 4);
  for (let v = Math.ceil(lo / yStep) * yStep; v <= hi + 1e-12; v += yStep) {
    node.append(svg("line", { x1: left, x2: left + plotW, y1: y(v), y2: y(v), class: "grid-line" }));
    node.append(svg("text", { x: left - 6, y: y(v) + 3.5, "text-anchor": "end", class: "tick" }, tickLabel(v, yStep)));
  }
  const xStep = xMax ? Math.max(1, niceStep(xMax, 6)) : 1;
  for (let s = 0; s <= xMax; s += xStep) {
    node.append(svg("text", { x: x(s), y: height - 8, "text-anchor": "middle", class: "tick" }, String(s)));
  }
  node.append(svg("line", { x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH, class: "axis" }));
  node.append(svg("line", { x1: left, x2: left, y1: top, y2: top + plotH, class: "axis" }));

  const order = series.map((_, i) => i).sort((a, b) => (a === highlight) - (b === highlight)); // highlighted on top
  for (const i of order) {
    const runs = [[]]; // the unbroken runs of points: a gap starts a new one
    for (let step = 0; step < series[i].length; step++) {
      const v = series[i][step];
      if (finite(v)) runs[runs.length - 1].push([x(step), y(v)]);
      else if (runs[runs.length - 1].length) runs.push([]);
    }
    const faded = highlight !== null && i !== highlight;
    for (const points of runs.filter((run) => run.length)) {
      node.append(svg("polyline", {
        points: points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "),
        stroke: color(i), class: faded ? "faded" : "", "data-chain": String(i), "data-points": String(points.length),
      }));
      if (points.length === 1) {
        // A line of one point draws nothing.
        const [[cx, cy]] = points;
        node.append(svg("circle", { cx, cy, r: 2.5, fill: color(i), class: faded ? "dot faded" : "dot" }));
      }
    }
    const last = runs.flat().pop();
    if (heads && last) {
      // The latest point, so that a line shows from its first step on.
      node.append(svg("circle", { cx: last[0], cy: last[1], r: 3, fill: color(i), class: "head" }));
    }
  }
  const marked = marker && series[marker.chain] && series[marker.chain][marker.step];
  if (finite(marked)) {
    node.append(svg("circle", { cx: x(marker.step), cy: y(marked), r: 4.5, fill: color(marker.chain), class: "best" }));
  }
}
