//! Small, dependency-free SVG charts: a labelled scatter and line charts with a legend.

const W: f64 = 640.0;
const H: f64 = 420.0;
const L: f64 = 70.0; // left margin
const R: f64 = 160.0; // right margin (legend)
const T: f64 = 40.0;
const B: f64 = 55.0;
const COLOURS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

struct Axes {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Axes {
    fn fit(xs: impl Iterator<Item = f64> + Clone, ys: impl Iterator<Item = f64> + Clone, pad: bool) -> Axes {
        let lo = |v: &mut dyn Iterator<Item = f64>| v.fold(f64::INFINITY, f64::min);
        let hi = |v: &mut dyn Iterator<Item = f64>| v.fold(f64::NEG_INFINITY, f64::max);
        let (mut x0, mut x1) = (lo(&mut xs.clone()), hi(&mut xs.clone()));
        let (mut y0, mut y1) = (lo(&mut ys.clone()), hi(&mut ys.clone()));
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            (x0, x1) = (x0 - 0.5, x1 + 0.5);
        }
        if y1 - y0 < 1e-12 {
            (y0, y1) = (y0 - 0.5, y1 + 0.5);
        }
        if pad {
            let (dx, dy) = ((x1 - x0) * 0.08, (y1 - y0) * 0.08);
            (x0, x1, y0, y1) = (x0 - dx, x1 + dx, y0 - dy, y1 + dy);
        }
        Axes { x0, x1, y0, y1 }
    }
    fn px(&self, x: f64) -> f64 {
        L + (x - self.x0) / (self.x1 - self.x0) * (W - L - R)
    }
    fn py(&self, y: f64) -> f64 {
        H - B - (y - self.y0) / (self.y1 - self.y0) * (H - T - B)
    }
    fn frame(&self, title: &str, xl: &str, yl: &str) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n\
             <rect x=\"{L}\" y=\"{T}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n",
            (W - R + L) / 2.0,
            esc(title),
            W - L - R,
            H - T - B
        );
        for k in 0..=4 {
            let f = k as f64 / 4.0;
            let (xv, yv) = (self.x0 + f * (self.x1 - self.x0), self.y0 + f * (self.y1 - self.y0));
            let (x, y) = (self.px(xv), self.py(yv));
            s += &format!("<line x1=\"{x}\" y1=\"{T}\" x2=\"{x}\" y2=\"{}\" stroke=\"#eee\"/>\n", H - B);
            s += &format!("<line x1=\"{L}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>\n", W - R);
            s += &format!("<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", H - B + 16.0, tick(xv));
            s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", L - 6.0, y + 4.0, tick(yv));
        }
        s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", (W - R + L) / 2.0, H - 12.0, esc(xl));
        s += &format!(
            "<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n",
            (H - B + T) / 2.0,
            (H - B + T) / 2.0,
            esc(yl)
        );
        s
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// One labelled point per run.
pub fn scatter(title: &str, x_label: &str, y_label: &str, points: &[(String, f64, f64)], note: &str) -> String {
    let ax = Axes::fit(points.iter().map(|p| p.1), points.iter().map(|p| p.2), true);
    let mut s = ax.frame(title, x_label, y_label);
    for (i, (name, x, y)) in points.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let (px, py) = (ax.px(*x), ax.py(*y));
        s += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"6\" fill=\"{c}\"/>\n");
        s += &format!("<text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>\n", px + 9.0, py - 7.0, esc(name));
        s += &format!("<text x=\"{}\" y=\"{}\" fill=\"{c}\">● {}</text>\n", W - R + 12.0, T + 16.0 + 18.0 * i as f64, esc(name));
    }
    s += &format!("<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#555\">{}</text>\n", W - R + 12.0, H - B, esc(note));
    s + "</svg>\n"
}

/// Line series (x ascending) with a legend.
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let all = || series.iter().flat_map(|(_, v)| v.iter());
    let ax = Axes::fit(all().map(|p| p.0), all().map(|p| p.1), false);
    let mut s = ax.frame(title, x_label, y_label);
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{:.1},{:.1}", ax.px(*x), ax.py(*y))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
        s += &format!("<text x=\"{}\" y=\"{}\" fill=\"{c}\">— {}</text>\n", W - R + 12.0, T + 16.0 + 18.0 * i as f64, esc(name));
    }
    s + "</svg>\n"
}
