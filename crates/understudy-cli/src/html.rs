//! Self-contained HTML reports: inline CSS and SVG, no scripts, no network.

use std::fmt::Write as _;

use understudy_eval::CascadeOutcome;

/// What the eval page plots for one model.
pub struct ModelPlots<'a> {
    pub name: &'a str,
    /// Empty for a generation task: no confusion matrix then.
    pub labels: &'a [String],
    /// Rows: the lead's label, columns: the model's.
    pub confusion: &'a [Vec<usize>],
    pub curve: &'a [CascadeOutcome],
    /// The certified threshold's outcome on test, if one was certified.
    pub chosen: Option<CascadeOutcome>,
}

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn page_start(title: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}\
         pre{{background:#fafafa;padding:1em;overflow-x:auto}}</style></head><body><h1>{}</h1>",
        escape(title),
        escape(title)
    )
}

/// The eval report: the terminal text, then per model a confusion heatmap
/// (label tasks) and the cascade's coverage-agreement curve with the chosen
/// point.
pub fn eval_page(task: &str, text: &str, models: &[ModelPlots<'_>]) -> String {
    let mut html = page_start(&format!("Understudy eval: task {task}"));
    let _ = write!(html, "<pre>{}</pre>", escape(text));
    for model in models {
        let _ = write!(html, "<h2>{}</h2>", escape(model.name));
        if !model.labels.is_empty() {
            html.push_str("<h3>Confusion (rows: lead, columns: understudy)</h3>");
            html.push_str(&confusion_table(model.labels, model.confusion));
        }
        html.push_str("<h3>Cascade: coverage against agreement on test</h3>");
        html.push_str(&curve_svg(model.curve, model.chosen));
    }
    html.push_str("</body></html>\n");
    html
}

fn confusion_table(labels: &[String], confusion: &[Vec<usize>]) -> String {
    let max = confusion.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let mut html = String::from("<table><tr><th></th>");
    for label in labels {
        let _ = write!(html, "<th>{}</th>", escape(label));
    }
    html.push_str("</tr>");
    for (label, row) in labels.iter().zip(confusion) {
        let _ = write!(html, "<tr><th>{}</th>", escape(label));
        for (col, count) in row.iter().enumerate() {
            let strength = *count as f64 / max;
            let on_diagonal = labels.get(col) == Some(label);
            let (r, g, b) = if on_diagonal { (92, 184, 92) } else { (217, 83, 79) };
            let _ = write!(html, "<td style=\"background:rgba({r},{g},{b},{strength:.3})\">{count}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    html
}

fn curve_svg(curve: &[CascadeOutcome], chosen: Option<CascadeOutcome>) -> String {
    let (width, height, pad) = (560.0, 320.0, 48.0);
    let min_agreement = curve.iter().map(|point| point.served_agreement).fold(1.0f64, f64::min).min(0.9);
    let x = |coverage: f64| pad + (width - 2.0 * pad) * coverage;
    let y = |agreement: f64| {
        height - pad - (height - 2.0 * pad) * (agreement - min_agreement) / (1.0 - min_agreement).max(1e-9)
    };
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\">");
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#888\"/>\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"#888\"/>\
         <text x=\"{2}\" y=\"{3}\" font-size=\"12\" text-anchor=\"middle\">coverage (share served by the understudy)</text>\
         <text x=\"12\" y=\"{4}\" font-size=\"12\" transform=\"rotate(-90 12 {4})\" text-anchor=\"middle\">agreement on served calls</text>\
         <text x=\"{pad}\" y=\"{5}\" font-size=\"10\">0</text><text x=\"{1}\" y=\"{5}\" font-size=\"10\">1</text>\
         <text x=\"20\" y=\"{0}\" font-size=\"10\">{6:.2}</text><text x=\"20\" y=\"{pad}\" font-size=\"10\">1.00</text>",
        height - pad,
        width - pad,
        width / 2.0,
        height - 8.0,
        height / 2.0,
        height - pad + 14.0,
        min_agreement
    );
    let mut points: Vec<&CascadeOutcome> = curve.iter().collect();
    points.sort_by(|a, b| a.coverage.total_cmp(&b.coverage));
    let path: Vec<String> =
        points.iter().map(|point| format!("{:.1},{:.1}", x(point.coverage), y(point.served_agreement))).collect();
    let _ =
        write!(svg, "<polyline points=\"{}\" fill=\"none\" stroke=\"#337ab7\" stroke-width=\"2\"/>", path.join(" "));
    if let Some(chosen) = chosen {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"#d9534f\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">\
             certified threshold {:.3}: coverage {:.1}%, agreement {:.1}%</text>",
            x(chosen.coverage),
            y(chosen.served_agreement),
            x(chosen.coverage) - 200.0,
            y(chosen.served_agreement) - 10.0,
            chosen.threshold,
            chosen.coverage * 100.0,
            chosen.served_agreement * 100.0
        );
    }
    svg.push_str("</svg>");
    svg
}
