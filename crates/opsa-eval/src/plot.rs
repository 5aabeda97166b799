//! Charts with `plotters`: a labelled scatter (one marker per run, optional error bars) and line
//! charts (optional ± band), each written as `stem.svg` and `stem.png`.
//!
//! Text is drawn with an embedded subset of DejaVu Sans (`assets/`, Bitstream Vera licence), so
//! a PNG renders the same on a machine without fonts. Ticks come from plotters' nice-number
//! axis; the legend sits in its own panel right of the plot and lists only series that have
//! something drawn.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::suite::EvalError;

const SIZE: (u32, u32) = (860, 500);
const LEGEND_W: u32 = 230;
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
static REGISTER: Once = Once::new();

/// The tab10 palette.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
];

/// Titles of one chart.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
}

/// One labelled point; `x_err`/`y_err` are half-widths of error bars (e.g. the sd over seeds).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub x_err: Option<f64>,
    pub y_err: Option<f64>,
}

/// One line; `err`, when given, holds one half-width per point and is drawn as a band.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub err: Option<Vec<f64>>,
}

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn register() {
    REGISTER.call_once(|| {
        // The bytes are ours and tested; a failure here is a build defect.
        register_font(FONT, FontStyle::Normal, FONT_BYTES).unwrap_or_else(|_| panic!("embedded font does not parse"));
    });
}

/// A padded axis range over `values` (finite only); a flat range is widened to ±0.5.
fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let (lo, hi) = if hi - lo < 1e-9 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
    let pad = (hi - lo) * 0.08;
    (lo - pad)..(hi + pad)
}

type DrawResult = Result<(), String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Split `root` into the plot and the legend panel; draw the legend entries (marker kind per
/// entry: `true` for a line, `false` for a point).
fn legend<DB: DrawingBackend>(panel: &DrawingArea<DB, Shift>, entries: &[(String, usize, bool)]) -> DrawResult {
    let font = (FONT, 13).into_font();
    for (row, (label, c, is_line)) in entries.iter().enumerate() {
        let y = 50 + 20 * row as i32;
        let col = colour(*c);
        if *is_line {
            panel.draw(&PathElement::new(vec![(8, y), (30, y)], col.stroke_width(3))).map_err(err)?;
        } else {
            draw_marker(panel, *c, (19, y))?;
        }
        let mut text = label.clone();
        if text.chars().count() > 26 {
            text = text.chars().take(25).collect::<String>() + "…";
        }
        panel.draw(&Text::new(text, (38, y - 7), font.clone().color(&BLACK))).map_err(err)?;
    }
    Ok(())
}

/// Draw marker `i` at `at` (pixels): the colour cycles every 10, the shape (circle, triangle,
/// square) every 10 after.
fn draw_marker<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, i: usize, at: (i32, i32)) -> DrawResult {
    let style = colour(i).filled();
    match (i / COLOURS.len()) % 3 {
        0 => area.draw(&Circle::new(at, 6, style)),
        1 => area.draw(&TriangleMarker::new(at, 7, style)),
        _ => area.draw(&Rectangle::new([(at.0 - 5, at.1 - 5), (at.0 + 5, at.1 + 5)], style)),
    }
    .map_err(err)
}

/// A tick label: no trailing zeros ("55", "0.25", "1e-4" stays readable as "0.0001").
fn tick(v: &f64) -> String {
    let s = format!("{:.6}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

type Axes<'a, DB> = ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;

/// The title, axes, nice ticks, labels and a light grid.
fn axes<'a, DB: DrawingBackend>(plot: &DrawingArea<DB, Shift>, chart: &Chart, x: std::ops::Range<f64>, y: std::ops::Range<f64>) -> Result<Axes<'a, DB>, String> {
    let mut ctx = ChartBuilder::on(plot)
        .caption(chart.title, (FONT, 19))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(err)?;
    Ok(ctx)
}

fn draw_scatter<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart, points: &[Point]) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let (plot, panel) = root.split_horizontally(SIZE.0 - LEGEND_W);
    let xs = points.iter().flat_map(|p| [p.x - p.x_err.unwrap_or(0.0), p.x + p.x_err.unwrap_or(0.0)]);
    let ys = points.iter().flat_map(|p| [p.y - p.y_err.unwrap_or(0.0), p.y + p.y_err.unwrap_or(0.0)]);
    let mut ctx = axes(&plot, chart, range(xs), range(ys))?;
    let mut entries = vec![];
    for (i, p) in points.iter().enumerate() {
        if !(p.x.is_finite() && p.y.is_finite()) {
            continue;
        }
        let style = colour(i).stroke_width(1);
        if let Some(e) = p.y_err.filter(|e| *e > 0.0) {
            ctx.draw_series(std::iter::once(ErrorBar::new_vertical(p.x, p.y - e, p.y, p.y + e, style, 8))).map_err(err)?;
        }
        if let Some(e) = p.x_err.filter(|e| *e > 0.0) {
            ctx.draw_series(std::iter::once(ErrorBar::new_horizontal(p.y, p.x - e, p.x, p.x + e, style, 8))).map_err(err)?;
        }
        let at = ctx.backend_coord(&(p.x, p.y));
        draw_marker(&plot, i, at)?;
        entries.push((p.label.clone(), i, false));
    }
    legend(&panel, &entries)?;
    root.present().map_err(err)
}

fn draw_lines<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart, series: &[Series]) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let (plot, panel) = root.split_horizontally(SIZE.0 - LEGEND_W);
    let band = |s: &Series, i: usize, sign: f64| s.err.as_ref().and_then(|e| e.get(i)).map_or(0.0, |e| sign * e);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().enumerate().flat_map(move |(i, p)| [p.1 + band(s, i, -1.0), p.1 + band(s, i, 1.0)]));
    let mut xr = range(xs);
    // Lines start where the data starts: no padding on x.
    xr = (xr.start + (xr.end - xr.start) * 0.08 / 1.16)..(xr.end - (xr.end - xr.start) * 0.08 / 1.16);
    let mut ctx = axes(&plot, chart, xr, range(ys))?;
    let mut entries = vec![];
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        if s.err.is_some() {
            let upper = s.points.iter().enumerate().map(|(k, p)| (p.0, p.1 + band(s, k, 1.0)));
            let lower = s.points.iter().enumerate().rev().map(|(k, p)| (p.0, p.1 + band(s, k, -1.0)));
            let poly: Vec<(f64, f64)> = upper.chain(lower).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
            ctx.draw_series(std::iter::once(Polygon::new(poly, colour(i).mix(0.18).filled()))).map_err(err)?;
        }
        ctx.draw_series(LineSeries::new(pts.clone(), colour(i).stroke_width(2))).map_err(err)?;
        if pts.len() == 1 {
            ctx.draw_series(std::iter::once(Circle::new(pts[0], 4, colour(i).filled()))).map_err(err)?;
        }
        entries.push((s.label.clone(), i, true));
    }
    legend(&panel, &entries)?;
    root.present().map_err(err)
}

/// Write `stem.svg` and `stem.png`, each atomically.
fn write_both(
    stem: &Path,
    svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> DrawResult,
    png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> DrawResult,
) -> Result<(), EvalError> {
    register();
    let fail = |what: &str, e: String| EvalError::Io(format!("{}.{what}: drawing failed: {e}", stem.display()));
    let mut text = String::new();
    svg(SVGBackend::with_string(&mut text, SIZE).into_drawing_area()).map_err(|e| fail("svg", e))?;
    crate::resume::write_atomic(&with_ext(stem, "svg"), &text)?;
    let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    png(BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area()).map_err(|e| fail("png", e))?;
    let mut bytes = vec![];
    {
        let mut enc = png::Encoder::new(&mut bytes, SIZE.0, SIZE.1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| fail("png", e.to_string()))?;
        w.write_image_data(&buf).map_err(|e| fail("png", e.to_string()))?;
    }
    Ok(crate::resume::write_atomic(&with_ext(stem, "png"), &bytes)?)
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// One marker per point, with error bars where given; writes `stem.svg` and `stem.png`.
pub fn scatter(chart: &Chart, points: &[Point], stem: &Path) -> Result<(), EvalError> {
    write_both(stem, |a| draw_scatter(a, chart, points), |a| draw_scatter(a, chart, points))
}

/// Line series with ± bands where given; writes `stem.svg` and `stem.png`.
pub fn lines(chart: &Chart, series: &[Series], stem: &Path) -> Result<(), EvalError> {
    write_both(stem, |a| draw_lines(a, chart, series), |a| draw_lines(a, chart, series))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_have_no_trailing_zeros() {
        assert_eq!(tick(&55.0), "55");
        assert_eq!(tick(&0.25), "0.25");
        assert_eq!(tick(&-0.0), "0");
        assert_eq!(tick(&1.5e-4), "0.00015");
    }

    #[test]
    fn ranges_are_padded_and_flat_ones_widened() {
        let r = range([1.0, 3.0].into_iter());
        assert!((r.start - 0.84).abs() < 1e-12 && (r.end - 3.16).abs() < 1e-12);
        let r = range([2.0, 2.0, f64::NAN].into_iter());
        assert!((r.start - 1.42).abs() < 1e-12 && (r.end - 2.58).abs() < 1e-12);
        assert_eq!(range(std::iter::empty()), 0.0..1.0);
    }

    #[test]
    fn charts_are_written_as_svg_and_png_with_text() {
        let dir = std::env::temp_dir().join(format!("opsa-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chart = Chart { title: "Safety vs reasoning", x_label: "safety (%)", y_label: "reasoning (%)" };
        let pts = vec![
            Point { label: "base".into(), x: 46.0, y: 60.5, x_err: None, y_err: None },
            Point { label: "opsa".into(), x: 85.8, y: 58.0, x_err: Some(3.0), y_err: Some(2.0) },
        ];
        scatter(&chart, &pts, &dir.join("s")).unwrap();
        let series = vec![
            Series { label: "drawn".into(), points: vec![(1.0, 0.5), (2.0, 0.7)], err: Some(vec![0.1, 0.1]) },
            Series { label: "empty".into(), points: vec![], err: None },
        ];
        lines(&chart, &series, &dir.join("l")).unwrap();
        let svg = std::fs::read_to_string(dir.join("l.svg")).unwrap();
        let has_text = |t: &str| svg.lines().any(|l| l.trim() == t);
        assert!(has_text("drawn") && !has_text("empty"), "the legend lists drawn series only");
        let png = std::fs::read(dir.join("s.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // Text was rasterised: the image has dark pixels in the title band.
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = dec.read_info().unwrap();
        let mut img = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut img).unwrap();
        let title_band = &img[(5 * SIZE.0 * 3) as usize..(30 * SIZE.0 * 3) as usize];
        assert!(title_band.iter().any(|&b| b < 100), "title text is drawn");
        std::fs::remove_dir_all(&dir).ok();
    }
}
