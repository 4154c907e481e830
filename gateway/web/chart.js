// Line charts on uPlot (vendor/uPlot.iife.min.js, window.uPlot): sized to their container,
// redrawn at most every 200 ms however fast data arrives.

const AXIS = "#8a93a3";
const GRID = "rgba(128, 128, 128, 0.18)";

export function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#2f5bd3";
}

export const PALETTE = ["#2f5bd3", "#e0662b", "#1e8a4c", "#8e44ad", "#c0392b", "#16a2b8", "#b7791f", "#5d6778"];

/** A compact number with ``digits`` significant digits: 0.00012 -> 1.2e-4, 12345 -> 12.3k. */
export function tick(v, digits = 2) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e6) return `${+(v / 1e6).toPrecision(digits + 1)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toPrecision(digits + 1)}k`;
  if (a >= 0.01) return `${+v.toPrecision(digits + 1)}`;
  return v.toExponential(digits - 1);
}

/** Tick labels with just enough digits to tell neighbours apart. */
function distinct(vals, format) {
  let labels = vals.map((v) => format(v, 2));
  for (let digits = 3; digits <= 6 && new Set(labels).size < vals.length; digits++) {
    labels = vals.map((v) => format(v, digits));
  }
  return labels;
}

/** The y range: uPlot's own, except for a (nearly) flat series, e.g. a constant learning rate or a
 * cosine that has barely started over a long run: uPlot would stretch a 1e-6 change over the whole
 * height (or draw nothing when it is exactly flat) with unreadable ticks. Such a series is shown as
 * what it is, a flat line in a ±10 % band around its value. */
function yRange(min, max) {
  if (min === null || max === null || !Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  if (max - min <= Math.abs(max) * 0.01) {
    const mid = (min + max) / 2;
    const pad = Math.abs(mid) * 0.1 || 1;
    return [mid - pad, mid + pad];
  }
  return window.uPlot.rangeNum(min, max, 0.1, true);
}

export class LineChart {
  /**
   * series: [{label, color, dash?, points?: "only" | true, width?}]
   * fmt: value formatter for the legend; yTick: axis tick formatter.
   */
  constructor(container, { series, height = 220, fmt = (v) => tick(v, 4), yTick = tick, xLabel = "iteration", yLabel = "", ySize = 58 }) {
    this.container = container;
    this.height = height;
    this.data = [[], ...series.map(() => [])];
    this.pending = false;
    this.lastDraw = 0;
    const opts = {
      width: Math.max(container.clientWidth, 300),
      height,
      scales: { x: { time: false }, y: { range: (u, min, max) => yRange(min, max) } },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      axes: [
        { stroke: AXIS, grid: { stroke: GRID }, ticks: { stroke: GRID }, label: xLabel, labelSize: 18,
          incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2500, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6] },
        { stroke: AXIS, grid: { stroke: GRID }, ticks: { stroke: GRID }, size: ySize,
          values: (u, vals) => distinct(vals, yTick), label: yLabel, labelSize: yLabel ? 18 : 0 },
      ],
      series: [
        { label: xLabel, value: (u, v) => (v === null || v === undefined ? "—" : String(v)) },
        ...series.map((s) => {
          const onlyPoints = s.points === "only";
          return {
            label: s.label,
            stroke: s.color,
            width: s.width ?? (onlyPoints ? 0 : 2),
            dash: s.dash,
            spanGaps: true,
            value: (u, v) => (v === null || v === undefined ? "—" : fmt(v)),
            points: onlyPoints
              ? { show: true, size: s.size ?? 9, width: 2, stroke: s.color, fill: s.fill ?? s.color, space: 0 }
              : { show: s.points === true, size: 5, space: 0 },
            ...(onlyPoints ? { paths: () => null } : {}),
          };
        }),
      ],
    };
    this.plot = new window.uPlot(opts, this.data, container);
    // Resize on the next frame: resizing inside the observer's callback would loop.
    this.observer = new ResizeObserver(() => requestAnimationFrame(() => this.resize()));
    this.observer.observe(container);
  }

  resize() {
    const width = this.container.clientWidth;
    if (width > 0 && Math.abs(width - this.plot.width) > 1) this.plot.setSize({ width, height: this.height });
  }

  /** data: [xs, ys1, ys2, ...]; drawn now or within 200 ms. */
  setData(data) {
    this.data = data;
    if (this.pending) return;
    const wait = Math.max(0, 200 - (performance.now() - this.lastDraw));
    this.pending = true;
    setTimeout(() => {
      this.pending = false;
      this.lastDraw = performance.now();
      this.plot.setData(this.data);
      this.container.dataset.points = String(this.data[0].length);
      this.container.dataset.last = String(this.data[0].at(-1) ?? "");
    }, wait);
  }

  /** Number of x values currently drawn (used by tests through data-points). */
  get points() { return this.plot.data[0]?.length || 0; }

  destroy() {
    this.observer.disconnect();
    this.plot.destroy();
  }
}
