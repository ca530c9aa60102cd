//! Small, dependency-free SVG charts for the self-contained HTML report.
//!
//! Every data point of a line chart is drawn as a `<circle class="pt">` and
//! every bar as a `<rect class="bar">`, so a test can count them. Text is
//! escaped; empty input renders a "no data" panel instead of failing.

use std::fmt::Write as _;

const W: f64 = 760.0;
const H: f64 = 260.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
/// Colours for series, in order.
pub const PALETTE: [&str; 8] = [
    "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
];

/// One line of a line chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn frame(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r##"<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"><title>{t}</title><rect width="{W}" height="{H}" fill="#fff"/><text x="{LEFT}" y="18" font-size="14" font-weight="600" fill="#111">{t}</text>"##,
        t = esc(title)
    );
}

fn no_data(out: &mut String) {
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" font-size="13" fill="#888" text-anchor="middle">no data</text></svg>"##,
        W / 2.0,
        H / 2.0
    );
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * mag)
}

fn axes(out: &mut String, y_max: f64, x_label: &str, y_label: &str) {
    let (x0, y0, x1, y1) = (LEFT, H - BOTTOM, W - RIGHT, TOP);
    let _ = write!(
        out,
        r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#444"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#444"/>"##
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = y0 - (y0 - y1) * f64::from(i) / 4.0;
        let _ = write!(
            out,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="10" fill="#555" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            y + 3.0,
            fmt_num(v)
        );
    }
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" font-size="11" fill="#333" text-anchor="middle">{}</text><text x="14" y="{}" font-size="11" fill="#333" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"##,
        (x0 + x1) / 2.0,
        H - 8.0,
        esc(x_label),
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0,
        esc(y_label)
    );
}

/// Formats an axis number compactly.
pub fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        // 12.5k, not 12k or 13k, for a gridline a quarter of 50k up.
        let k = format!("{:.1}", v / 1e3);
        format!("{}k", k.strip_suffix(".0").unwrap_or(&k))
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart; `marker` draws a labelled vertical line at an x value.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series], marker: Option<(f64, &str)>) -> String {
    let mut out = String::new();
    frame(&mut out, title);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_top) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_top = y_top.max(y);
    }
    if x_min > x_max {
        no_data(&mut out);
        return out;
    }
    if let Some((m, _)) = marker {
        x_min = x_min.min(m);
        x_max = x_max.max(m);
    }
    // One point (or a marker on it) spans nothing: a second around it.
    // A wider floor squeezed a sell-out of a quarter second into a quarter
    // of the width, under labels that named the data's own ends.
    let span = if x_max > x_min { x_max - x_min } else { 1.0 };
    let y_max = nice_max(y_top);
    axes(&mut out, y_max, x_label, y_label);
    let sx = |x: f64| LEFT + (x - x_min) / span * (W - LEFT - RIGHT);
    let sy = |y: f64| H - BOTTOM - y / y_max * (H - TOP - BOTTOM);
    let _ = write!(
        out,
        r##"<text x="{LEFT}" y="{}" font-size="10" fill="#555">{}</text><text x="{}" y="{}" font-size="10" fill="#555" text-anchor="end">{}</text>"##,
        H - BOTTOM + 14.0,
        fmt_num(x_min),
        W - RIGHT,
        H - BOTTOM + 14.0,
        fmt_num(x_min + span)
    );
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"##,
            path.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = write!(
                out,
                r##"<circle class="pt" cx="{:.1}" cy="{:.1}" r="1.8" fill="{colour}"/>"##,
                sx(x),
                sy(y)
            );
        }
        let _ = write!(
            out,
            r##"<rect x="{}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}" font-size="11" fill="#333">{}</text>"##,
            LEFT + 8.0,
            TOP + 4.0 + 14.0 * i as f64,
            LEFT + 22.0,
            TOP + 13.0 + 14.0 * i as f64,
            esc(&s.name)
        );
    }
    if let Some((m, label)) = marker {
        let x = sx(m);
        // Label on the side with room: left of the line in the right half.
        let (tx, anchor) = if x > W / 2.0 {
            (x - 4.0, "end")
        } else {
            (x + 4.0, "start")
        };
        let _ = write!(
            out,
            r##"<line class="marker" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#dc2626" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{}" font-size="11" fill="#dc2626" text-anchor="{anchor}">{}</text>"##,
            H - BOTTOM,
            TOP + 10.0,
            esc(label)
        );
    }
    out.push_str("</svg>");
    out
}

/// A bar chart of labelled values.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let mut out = String::new();
    frame(&mut out, title);
    if bars.is_empty() {
        no_data(&mut out);
        return out;
    }
    let y_max = nice_max(bars.iter().map(|b| b.1).fold(0.0, f64::max));
    axes(&mut out, y_max, "", y_label);
    let slot = (W - LEFT - RIGHT) / bars.len() as f64;
    for (i, (label, v)) in bars.iter().enumerate() {
        let h = v / y_max * (H - TOP - BOTTOM);
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let _ = write!(
            out,
            r##"<rect class="bar" x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {}</title></rect><text x="{:.1}" y="{}" font-size="10" fill="#333" text-anchor="middle">{}</text>"##,
            H - BOTTOM - h,
            slot * 0.7,
            PALETTE[0],
            esc(label),
            fmt_num(*v),
            x + slot * 0.35,
            H - BOTTOM + 14.0,
            esc(label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::fmt_num;

    /// The gridlines a quarter and three quarters up a 50k axis read 12.5k
    /// and 37.5k (they read 12k and 38k).
    #[test]
    fn axis_numbers_keep_a_tenth_of_a_thousand() {
        assert_eq!(fmt_num(12_500.0), "12.5k");
        assert_eq!(fmt_num(37_500.0), "37.5k");
        assert_eq!(fmt_num(50_000.0), "50k");
        assert_eq!(fmt_num(2_500_000.0), "2.5M");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(400.0), "400");
    }
}
