//! Shared pieces of command output: opening the store, filters, tables.

use std::path::Path;

use anyhow::Context;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use understudy_config::Config;
use understudy_store::{CallFilter, StatusFilter, Store};

use crate::cli::FilterArgs;

pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    if !path.exists() {
        anyhow::bail!("no config file at {} (run `understudy init` to write one, or pass --config)", path.display());
    }
    Ok(Config::load(path)?)
}

pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::connect(&config.store.url).await?)
}

pub fn parse_time(text: &str, flag: &str) -> anyhow::Result<OffsetDateTime> {
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let date = Date::parse(text, format_description!("[year]-[month]-[day]"))
        .with_context(|| format!("--{flag} `{text}` is neither RFC 3339 nor YYYY-MM-DD"))?;
    Ok(date.midnight().assume_utc())
}

pub fn call_filter(args: &FilterArgs) -> anyhow::Result<CallFilter> {
    let status = match args.status.as_deref() {
        None => None,
        Some("ok") => Some(StatusFilter::Ok),
        Some("error") => Some(StatusFilter::Error),
        Some(code) => Some(StatusFilter::Code(
            code.parse().with_context(|| format!("--status `{code}` is not ok, error or an HTTP status code"))?,
        )),
    };
    Ok(CallFilter {
        task: args.task.clone(),
        model: args.model.clone(),
        since: args.since.as_deref().map(|text| parse_time(text, "since")).transpose()?,
        until: args.until.as_deref().map(|text| parse_time(text, "until")).transpose()?,
        status,
        ..CallFilter::default()
    })
}

pub fn format_time(at: OffsetDateTime) -> String {
    at.format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second]")).unwrap_or_default()
}

pub use understudy_loop::ledger::format_day;

/// Renders rows as a plain-text table with aligned columns; numbers align right.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (column_idx, cell) in row.iter().enumerate() {
            widths[column_idx] = widths[column_idx].max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(column_idx, cell)| {
                let width = widths[column_idx];
                let is_number = cell.chars().next().is_some_and(|first| first.is_ascii_digit() || first == '$');
                if is_number {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut lines = vec![render(header.to_vec())];
    for row in rows {
        lines.push(render(row.iter().map(String::as_str).collect()));
    }
    lines.join("\n") + "\n"
}

pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The drift watch's encoder, loaded: the one `name` names (an error if it
/// is not there), or the built-in MiniLM when it is on this machine.
pub fn drift_encoder(
    config: &Config,
    name: Option<&str>,
) -> anyhow::Result<Option<std::sync::Arc<dyn understudy_providers::LocalModel>>> {
    let path = match (understudy_loop::resolve_encoder(config, name), name) {
        (Ok(path), _) => path,
        (Err(_), None) => return Ok(None),
        (Err(error), Some(_)) => return Err(error.into()),
    };
    let spec = understudy_providers::LocalModelSpec {
        name: "drift-encoder".into(),
        path: path.display().to_string(),
        adapter: None,
        weights: None,
        max_batch: None,
        speculative_draft: None,
    };
    let model = understudy_providers::LocalLoader::load(&understudy_local::Loader, &spec)
        .with_context(|| format!("cannot load the drift encoder {}", path.display()))?;
    Ok(Some(model))
}
