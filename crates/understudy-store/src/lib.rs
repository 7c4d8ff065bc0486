//! The store: the only crate that speaks SQL.
//!
//! One schema, one set of queries, two backends: SQLite (a file in WAL mode,
//! the embedded default) and Postgres (for several gateways sharing a store).
//! Both go through sqlx's `Any` driver, so every query is written once in
//! portable SQL; only the bind placeholders differ (`?` on SQLite, `$N` on
//! Postgres).

mod calls;
mod datasets;
mod feedback;
mod models;
mod policies;
mod recorder;
pub mod testing;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use calls::{CallFilter, CallOrder, CostGroup, CostRow, SavingsRow, StatusFilter};
pub use datasets::DatasetRecord;
pub use models::ModelVersionRecord;
pub use policies::PolicyChange;
pub use recorder::{Recorder, RecorderConfig, RecorderHandle, RecorderStats};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot apply migrations to store {url}: {source}")]
    Migrate { url: String, source: sqlx::migrate::MigrateError },
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("store row {id} is corrupt: {message}")]
    CorruptRow { id: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to the store, with migrations applied.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens (creating if needed) the store at `url` and applies migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let connect_error = |source| StoreError::Connect { url: redact_url(url), source };
        let (backend, url_with_options) = if url.starts_with("sqlite:") {
            // `mode=rwc` creates the file on first use.
            let url_with_options = if url.contains("mode=") || url.contains(":memory:") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url_with_options)
        } else {
            (Backend::Postgres, url.to_string())
        };
        let options = AnyConnectOptions::from_str(&url_with_options).map_err(connect_error)?;
        let pool_options = match backend {
            // One writer is all SQLite allows; readers share the WAL.
            Backend::Sqlite => AnyPoolOptions::new().max_connections(4).after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            }),
            Backend::Postgres => AnyPoolOptions::new().max_connections(8),
        };
        let pool =
            pool_options.acquire_timeout(Duration::from_secs(30)).connect_with(options).await.map_err(connect_error)?;
        MIGRATOR.run(&pool).await.map_err(|source| StoreError::Migrate { url: redact_url(url), source })?;
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool after in-flight queries finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A URL fit for an error message: any password in it is replaced.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_url_hides_passwords() {
        assert_eq!(super::redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("sqlite:///x.db"), "sqlite:///x.db");
    }
}
