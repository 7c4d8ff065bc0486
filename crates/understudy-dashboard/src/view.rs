//! The templates (embedded, auto-escaped) and the filters they format
//! figures with.

use std::sync::OnceLock;

use minijinja::value::Value;
use minijinja::Environment;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../templates/base.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("error.html", include_str!("../templates/error.html")),
    ("overview.html", include_str!("../templates/overview.html")),
    ("task.html", include_str!("../templates/task.html")),
    ("calls.html", include_str!("../templates/calls.html")),
    ("call.html", include_str!("../templates/call.html")),
    ("keys.html", include_str!("../templates/keys.html")),
];

fn environment() -> &'static Environment<'static> {
    static ENVIRONMENT: OnceLock<Environment<'static>> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            // The templates are part of the binary; a syntax error in one
            // fails the crate's tests, and renders as an error page here.
            if let Err(error) = env.add_template(name, source) {
                tracing::error!(%error, template = name, "dashboard template does not parse");
            }
        }
        env.add_filter("money", money);
        env.add_filter("percent", percent);
        env.add_filter("truncate", truncate);
        env
    })
}

/// `$0.001234`: money with the digits a per-call cost needs.
fn money(value: Option<f64>) -> String {
    // -0.0 prints as "$-0.000000"; it is nothing.
    match value.map(|value| if value == 0.0 { 0.0 } else { value }) {
        None => "-".into(),
        Some(value) if value.abs() >= 100.0 => format!("${value:.2}"),
        Some(value) => format!("${value:.6}"),
    }
}

/// `98.7 %` from 0.987.
fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |value| format!("{:.1} %", 100.0 * value))
}

/// The first `chars` characters of `text` (whole characters), with `…`
/// when cut.
fn truncate(text: String, chars: Option<usize>) -> String {
    let chars = chars.unwrap_or(80);
    match text.char_indices().nth(chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

pub fn render(template: &str, context: Value) -> Result<String, minijinja::Error> {
    environment().get_template(template)?.render(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        for (name, _) in TEMPLATES {
            assert!(environment().get_template(name).is_ok(), "{name} does not parse");
        }
    }

    #[test]
    fn figures_are_formatted_for_people() {
        assert_eq!(money(Some(0.0012346)), "$0.001235");
        assert_eq!(money(Some(1234.5)), "$1234.50");
        assert_eq!(money(None), "-");
        assert_eq!(money(Some(-0.0)), "$0.000000");
        assert_eq!(percent(Some(0.9871)), "98.7 %");
        assert_eq!(truncate("héllo wörld".into(), Some(5)), "héllo…");
        assert_eq!(truncate("short".into(), Some(5)), "short");
    }
}
