//! Dependency-free SVG line charts (one row of panels, shared legend).

use std::fmt::Write as _;

const PANEL_W: f64 = 480.0;
const PANEL_H: f64 = 340.0;
const PLOT_TOP: f64 = 40.0;
const PLOT_BOTTOM: f64 = PANEL_H - 56.0;
const FONT: &str = "-apple-system, BlinkMacSystemFont, 'Segoe UI', Helvetica, Arial, sans-serif";
/// Okabe-Ito palette: distinct for colour-blind readers.
const COLORS: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];
const MID: &str = " text-anchor=\"middle\"";
const MID13: &str = " text-anchor=\"middle\" font-size=\"13\"";
const MID_GREY: &str = " text-anchor=\"middle\" fill=\"#666\"";
const DASHES: [&str; 4] = ["", "7 4", "2 3", "10 3 2 3"];

/// One line on a chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Legend label; series with the same name share a style across charts.
    pub name: String,
    /// (x, y) points; drawn sorted by x. Non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One chart panel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    /// Title drawn above the panel.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label left of the y axis (rotated).
    pub y_label: String,
    /// Logarithmic x axis (base 10) — the caller uses it for client counts 100..20000.
    pub log_x: bool,
    /// Logarithmic y axis (base 10).
    pub log_y: bool,
    /// The lines to draw.
    pub series: Vec<Series>,
}

/// Renders the charts side by side (a row of panels, each about 480x340 px) as one
/// standalone SVG document, with a shared legend, and an optional caption line
/// under them (e.g. the machine and date). Returns the SVG text.
pub fn render_svg(charts: &[Chart], caption: Option<&str>) -> String {
    // Shared legend: names in order of first appearance; style follows the name.
    let mut names: Vec<&str> = Vec::new();
    for s in charts.iter().flat_map(|c| &c.series) {
        if !names.contains(&s.name.as_str()) {
            names.push(&s.name);
        }
    }
    let width = PANEL_W * charts.len().max(1) as f64;
    let mut rows: Vec<Vec<(usize, f64)>> = Vec::new();
    let mut row_w = f64::INFINITY;
    for (i, name) in names.iter().enumerate() {
        let w = 34.0 + text_width(name, 13.0) + 22.0;
        if row_w + w > width - 40.0 {
            rows.push(Vec::new());
            row_w = 0.0;
        }
        if let Some(r) = rows.last_mut() {
            r.push((i, w));
        }
        row_w += w;
    }
    let legend_top = PANEL_H + 6.0;
    let caption_y = legend_top + 24.0 * rows.len() as f64 + 16.0;
    let height = caption_y + if caption.is_some() { 14.0 } else { -6.0 };

    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"{FONT}\" font-size=\"12\" fill=\"#222\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
    );
    for (i, chart) in charts.iter().enumerate() {
        render_panel(&mut out, chart, PANEL_W * i as f64, &names);
    }
    for (r, row) in rows.iter().enumerate() {
        let y = legend_top + 24.0 * r as f64 + 12.0;
        let mut x = (width - row.iter().map(|&(_, w)| w).sum::<f64>()) / 2.0 + 11.0;
        for &(i, w) in row {
            let (color, dash) = (COLORS[i % COLORS.len()], DASHES[i % DASHES.len()]);
            let style =
                format!(" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"");
            line(&mut out, (x, y), (x + 28.0, y), &style);
            marker(&mut out, i, x + 14.0, y, color);
            text(&mut out, x + 34.0, y + 4.5, " font-size=\"13\"", names[i]);
            x += w;
        }
    }
    if let Some(c) = caption {
        text(&mut out, width / 2.0, caption_y, MID_GREY, c);
    }
    out.push_str("</svg>\n");
    out
}

/// A mapped axis: data domain `lo..hi` and the tick values inside it.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Builds an axis covering `(min, max)` (`None` when there is no data).
    fn new(range: Option<(f64, f64)>, log: bool, zero: bool) -> Axis {
        if log {
            let (min, max) = range.unwrap_or((1.0, 10.0));
            let (mut lo, mut hi) = (nice_log(min, false), nice_log(max, true));
            if hi <= lo {
                (lo, hi) = (nice_log(min * 0.99, false), nice_log(max * 1.01, true));
            }
            let span = (hi / lo).log10();
            if span > 3.2 {
                (lo, hi) = (
                    10f64.powf(lo.log10().floor()),
                    10f64.powf(hi.log10().ceil()),
                );
            }
            let span = (hi / lo).log10();
            let (mantissas, step): (&[f64], i32) = match span {
                s if s <= 1.2 => (&[1.0, 2.0, 3.0, 5.0], 1),
                s if s <= 3.2 => (&[1.0, 2.0, 5.0], 1),
                s => (&[1.0], (s / 6.0).ceil() as i32),
            };
            let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            let ticks = (e0..=e1)
                .filter(|e| (e - e0) % step == 0)
                .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
                .filter(|&t| t >= lo * (1.0 - 1e-9) && t <= hi * (1.0 + 1e-9))
                .collect();
            return Axis { log, lo, hi, ticks };
        }
        let (mut lo, mut hi) = range.unwrap_or((0.0, 1.0));
        if zero {
            (lo, hi) = (lo.min(0.0), hi.max(0.0));
        }
        if hi <= lo {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.5 };
            (lo, hi) = (if zero { lo } else { lo - d }, hi + d);
        }
        let raw = (hi - lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let mut steps = [(1.5, 1.0), (3.5, 2.0), (7.5, 5.0)].into_iter();
        let step = mag * steps.find(|&(t, _)| raw / mag < t).map_or(10.0, |s| s.1);
        if !(step.is_finite() && step > 0.0) {
            return Axis::new(None, false, false);
        }
        let (i0, i1) = ((lo / step).floor() as i64, (hi / step).ceil() as i64);
        let ticks = (i0..=i1).map(|i| i as f64 * step).collect();
        let (lo, hi) = (i0 as f64 * step, i1 as f64 * step);
        Axis { log, lo, hi, ticks }
    }

    /// Position of `v` along the axis, 0.0 at `lo` to 1.0 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v / self.lo).log10() / (self.hi / self.lo).log10()
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }
}

/// Nearest 1/2/5 x 10^k at or below (`up == false`) or at or above `v > 0`.
fn nice_log(v: f64, up: bool) -> f64 {
    let c = [1.0, 2.0, 5.0, 10.0].map(|c| c * 10f64.powf(v.log10().floor()));
    let pick = match up {
        true => c.into_iter().find(|&c| c >= v * (1.0 - 1e-9)),
        false => c.into_iter().rev().find(|&c| c <= v * (1.0 + 1e-9)),
    };
    pick.unwrap_or(v)
}

/// Whether a value can be placed on an axis of the given kind.
fn usable(v: f64, log: bool) -> bool {
    v.is_finite() && v.abs() <= 1e300 && (!log || v >= 1e-300)
}

/// Draws one chart panel whose left edge is at `ox`; `names` orders the styles.
fn render_panel(out: &mut String, chart: &Chart, ox: f64, names: &[&str]) {
    let lines: Vec<(usize, Vec<(f64, f64)>)> = chart
        .series
        .iter()
        .map(|s| {
            let mut pts: Vec<(f64, f64)> = (s.points.iter().copied())
                .filter(|&(x, y)| usable(x, chart.log_x) && usable(y, chart.log_y))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (names.iter().position(|n| *n == s.name).unwrap_or(0), pts)
        })
        .collect();
    let all = || lines.iter().flat_map(|(_, p)| p.iter().copied());
    let range = |f: fn((f64, f64)) -> f64| {
        let (lo, hi) = all()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        (lo <= hi).then_some((lo, hi))
    };
    let xa = Axis::new(range(|p| p.0), chart.log_x, false);
    let ya = Axis::new(range(|p| p.1), chart.log_y, true);
    let y_labels: Vec<String> = ya.ticks.iter().map(|&t| fmt_num(t)).collect();
    let label_w = y_labels
        .iter()
        .map(|l| text_width(l, 12.0))
        .fold(0.0, f64::max);
    let (left, right) = (ox + 34.0 + label_w, ox + PANEL_W - 22.0);
    let (top, bottom) = (PLOT_TOP, PLOT_BOTTOM);
    let px = |x: f64| left + xa.frac(x) * (right - left);
    let py = |y: f64| bottom - ya.frac(y) * (bottom - top);

    let mid_x = (left + right) / 2.0;
    let bold = " text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\"";
    text(out, mid_x, 24.0, bold, &chart.title);
    let _ = writeln!(out, "<g stroke=\"#e3e3e3\" stroke-width=\"1\">");
    for &t in &xa.ticks {
        line(out, (px(t), top), (px(t), bottom), "");
    }
    for &t in &ya.ticks {
        line(out, (left, py(t)), (right, py(t)), "");
    }
    let (w, h) = (right - left, bottom - top);
    let frame = format!("x=\"{left:.1}\" y=\"{top}\" width=\"{w:.1}\" height=\"{h}\"");
    let _ = writeln!(out, "</g>\n<rect {frame} fill=\"none\" stroke=\"#888\"/>");
    // Tick labels, skipping any that would collide with the previous one.
    let mut last = f64::NEG_INFINITY;
    for &t in &xa.ticks {
        let (x, label) = (px(t), fmt_num(t));
        let half = text_width(&label, 12.0) / 2.0;
        if x - half >= last + 6.0 {
            text(out, x, bottom + 17.0, MID, &label);
            last = x + half;
        }
    }
    let mut last = f64::INFINITY;
    for (&t, label) in ya.ticks.iter().zip(&y_labels) {
        let y = py(t);
        if y <= last - 15.0 {
            text(out, left - 6.0, y + 4.0, " text-anchor=\"end\"", label);
            last = y;
        }
    }
    let (mid_y, yl_x) = ((top + bottom) / 2.0, ox + 18.0);
    text(out, mid_x, bottom + 40.0, MID13, &chart.x_label);
    let rot = format!("{MID13} transform=\"rotate(-90 {yl_x:.1} {mid_y:.1})\"");
    text(out, yl_x, mid_y, &rot, &chart.y_label);
    if all().next().is_none() {
        text(out, mid_x, mid_y, MID_GREY, "no data");
    }
    for (i, pts) in &lines {
        let color = COLORS[i % COLORS.len()];
        if pts.len() > 1 {
            let p = coords(pts.iter().map(|&(x, y)| (px(x), py(y))), " ");
            let dash = DASHES[i % DASHES.len()];
            let _ = writeln!(
                out,
                "<polyline points=\"{p}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" \
                 stroke-linejoin=\"round\" stroke-dasharray=\"{dash}\"/>"
            );
        }
        for &(x, y) in pts {
            marker(out, *i, px(x), py(y), color);
        }
    }
}

/// Draws point marker number `kind`: circle, square, triangles, diamond, cross.
fn marker(out: &mut String, kind: usize, x: f64, y: f64, color: &str) {
    let fill = format!("fill=\"{color}\" stroke=\"#fff\" stroke-width=\"1\"");
    let poly = |p: &[(f64, f64)]| {
        let d = coords(p.iter().map(|(dx, dy)| (x + dx, y + dy)), "L");
        format!("<path d=\"M{d}Z\" {fill}/>")
    };
    let el = match kind % 6 {
        0 => format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4.2\" {fill}/>"),
        1 => poly(&[(-4.0, -4.0), (4.0, -4.0), (4.0, 4.0), (-4.0, 4.0)]),
        2 => poly(&[(0.0, -5.5), (5.0, 4.0), (-5.0, 4.0)]),
        3 => poly(&[(0.0, -5.5), (5.5, 0.0), (0.0, 5.5), (-5.5, 0.0)]),
        4 => poly(&[(0.0, 5.5), (5.0, -4.0), (-5.0, -4.0)]),
        _ => format!(
            "<path d=\"M{:.1},{:.1}l8,8m0,-8l-8,8\" stroke=\"{color}\" stroke-width=\"2.5\"/>",
            x - 4.0,
            y - 4.0
        ),
    };
    let _ = writeln!(out, "{el}");
}

/// Formats points as `x,y` pairs joined by `sep`.
fn coords(pts: impl Iterator<Item = (f64, f64)>, sep: &str) -> String {
    let v: Vec<String> = pts.map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    v.join(sep)
}

/// Compact tick label: 100, 1k, 2.5k, 1M, 0.5, 1e-6 (no trailing zeros).
fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let a = v.abs();
    if !(1e-4..1e15).contains(&a) {
        let s = format!("{v:.3e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{e}", trim(m));
    }
    let units = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")];
    let (scale, suffix) = units
        .into_iter()
        .find(|&(u, _)| a >= u)
        .unwrap_or((1.0, ""));
    let s = v / scale;
    let decimals = (4 - s.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{}{suffix}", trim(&format!("{s:.decimals$}")))
}

/// Writes a `<line>` element; `attrs` is empty or starts with a space.
fn line(out: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), attrs: &str) {
    let _ = writeln!(
        out,
        "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\"{attrs}/>"
    );
}

/// Writes a `<text>` element; `attrs` starts with a space, `body` is escaped.
fn text(out: &mut String, x: f64, y: f64, attrs: &str, body: &str) {
    let _ = writeln!(
        out,
        "<text x=\"{x:.1}\" y=\"{y:.1}\"{attrs}>{}</text>",
        esc(body)
    );
}

/// Drops trailing zeros (and a bare trailing point) from a decimal string.
fn trim(s: &str) -> &str {
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.'),
        false => s,
    }
}

/// Rough rendered width of `s` in a sans-serif font of `size` px.
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.58
}

/// Escapes text for XML content and attribute values.
fn esc(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    clean
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}
