//! The store: the only crate that speaks SQL.
//!
//! One schema, one set of queries, two backends: SQLite (a file in WAL mode,
//! the embedded default) and Postgres (for several gateways sharing a store).
//! Both go through sqlx's `Any` driver, so every query is written once in
//! portable SQL; only the bind placeholders differ (`?` on SQLite, `$N` on
//! Postgres).

mod autopilot;
mod calls;
mod datasets;
mod feedback;
mod keys;
mod models;
mod policies;
pub mod record_file;
mod recorder;
mod retention;
mod rollups;
pub mod testing;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use autopilot::AutopilotEvent;
pub use calls::{CallFilter, CallOrder, CallOwner, CostGroup, CostRow, KeyCostRow, SavingsRow, StatusFilter};
pub use datasets::DatasetRecord;
pub use models::ModelVersionRecord;
pub use policies::PolicyChange;
pub use recorder::{Recorder, RecorderConfig, RecorderHandle, RecorderStats, ShutdownReport};
pub use retention::Pruned;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot apply migrations to store {url}: {source}")]
    Migrate { url: String, source: sqlx::migrate::MigrateError },
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("store file {path} is not writable: the gateway records every call, so it needs write access (check the file's and its folder's permissions)")]
    NotWritable { path: PathBuf },
    #[error("store row {id} is corrupt: {message}")]
    CorruptRow { id: String, message: String },
    #[error("a usable key is already named `{0}`: revoke it first, or choose another name")]
    KeyNameTaken(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to the store, with migrations applied.
///
/// Clones share one pool, which [`Store::reopen`] can replace: a SQLite
/// connection that saw an I/O error keeps answering `database is locked`
/// after the disk recovers, so the recorder opens a fresh pool instead, and
/// every clone (the policy watcher, feedback) moves to it.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Arc<RwLock<AnyPool>>,
    backend: Backend,
    url: Arc<str>,
    /// For SQLite: the database file and its identity when it was opened, to
    /// notice a file deleted or replaced under a running store.
    sqlite_file: Option<Arc<SqliteFile>>,
}

#[derive(Debug)]
struct SqliteFile {
    path: PathBuf,
    identity: RwLock<Option<FileIdentity>>,
}

/// How long a SQLite reopen waits for the old pool's connections to close.
const SQLITE_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Device and inode: a file deleted and created again under the same name
/// is a different file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

fn file_identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|metadata| FileIdentity { device: metadata.dev(), inode: metadata.ino() })
}

impl Store {
    /// Opens (creating if needed) the store at `url` and applies migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let (backend, pool) = open_pool(url).await?;
        let sqlite_file = sqlite_path(url).map(|path| {
            let identity = RwLock::new(file_identity(&path));
            Arc::new(SqliteFile { path, identity })
        });
        Ok(Store { pool: Arc::new(RwLock::new(pool)), backend, url: Arc::from(url), sqlite_file })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The current pool; cheap to clone.
    pub(crate) fn pool(&self) -> AnyPool {
        match self.pool.read() {
            Ok(pool) => pool.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the pool with a freshly opened one (migrations applied, so a
    /// database recreated empty gets its tables back). The old pool's
    /// connections close as their queries end.
    pub async fn reopen(&self) -> Result<(), StoreError> {
        if let Some(file) = &self.sqlite_file {
            // A SQLite connection that saw an I/O error is never used again,
            // not even once the files take writes again: batches it then
            // committed were counted written but were not in the file after
            // it closed (issue 12, 30 of 60 records, in 2 runs of 3). So the
            // old pool is closed first, whatever the files' state; until a
            // reopen succeeds, the store answers `PoolClosed` (the recorder
            // sees it as unreachable, keeps its batch and retries).
            let old = self.pool();
            if tokio::time::timeout(SQLITE_CLOSE_WAIT, old.close()).await.is_err() {
                tracing::warn!("connections of the old SQLite pool were still busy after {SQLITE_CLOSE_WAIT:?}");
            }
            check_sqlite_writable(&self.url, &file.path)?;
        }
        let (_backend, pool) = open_pool(&self.url).await?;
        let old = {
            let mut guard = match self.pool.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::replace(&mut *guard, pool)
        };
        if let Some(file) = &self.sqlite_file {
            let mut identity = match file.identity.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            *identity = file_identity(&file.path);
        }
        // Closing waits for checked-out connections; don't hold the caller
        // (for SQLite it is closed already).
        tokio::spawn(async move { old.close().await });
        Ok(())
    }

    /// Applies migrations again: a database dropped and recreated empty
    /// under a running gateway gets its tables back.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.pool();
        MIGRATOR.run(&pool).await.map_err(|source| StoreError::Migrate { url: redact_url(&self.url), source })?;
        rollups::backfill(&pool).await
    }

    /// Whether the store takes a write now: a no-op DELETE on `calls` in a
    /// transaction that is rolled back. A read alone would pass on a SQLite
    /// file another process holds locked, or on a database without tables.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut transaction = self.pool().begin().await?;
        sqlx::query("DELETE FROM calls WHERE id = ''").execute(&mut *transaction).await?;
        transaction.rollback().await?;
        Ok(())
    }

    /// For SQLite: `Some(path)` when the database file this store opened
    /// is gone or was replaced by another file (deleted while serving).
    pub fn vanished_file(&self) -> Option<&Path> {
        let file = self.sqlite_file.as_ref()?;
        let opened = match file.identity.read() {
            Ok(guard) => *guard,
            Err(poisoned) => *poisoned.into_inner(),
        };
        let opened = opened?;
        (file_identity(&file.path) != Some(opened)).then_some(file.path.as_path())
    }

    /// The store's URL with any password hidden, for messages.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Closes the pool after in-flight queries finish.
    pub async fn close(&self) {
        self.pool().close().await;
    }
}

async fn open_pool(url: &str) -> Result<(Backend, AnyPool), StoreError> {
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
    if let Some(path) = sqlite_path(url) {
        check_sqlite_writable(url, &path)?;
    }
    let options = AnyConnectOptions::from_str(&url_with_options).map_err(connect_error)?;
    let sqlite_file = sqlite_path(url);
    let check_url = url.to_string();
    let pool_options = match backend {
        // One writer is all SQLite allows; readers share the WAL.
        Backend::Sqlite => AnyPoolOptions::new().max_connections(4).after_connect(move |conn, _meta| {
            // The pool opens connections later too: each is checked like the
            // first, before its first WAL access maps the `-shm` file.
            let writable = match &sqlite_file {
                Some(path) => check_sqlite_writable(&check_url, path).map_err(|error| {
                    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, error.to_string()))
                }),
                None => Ok(()),
            };
            Box::pin(async move {
                writable?;
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
    rollups::backfill(&pool).await?;
    Ok((backend, pool))
}

/// The file of a `sqlite://` URL, or `None` for other URLs and `:memory:`.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.contains(":memory:")).then(|| PathBuf::from(path))
}

/// A read-only file or folder is named at once; sqlx would otherwise time
/// out after 30 s with "pool timed out". The WAL and its shared-memory index
/// are checked too: SQLite opens an unwritable `-shm` read-only and maps
/// it, and a process that then writes through that mapping dies of SIGBUS
/// (issue 12). So no connection is opened while any of them is unwritable;
/// the recorder keeps its batch and tries again.
fn check_sqlite_writable(url: &str, path: &Path) -> Result<(), StoreError> {
    if url.contains("mode=ro") {
        return Ok(());
    }
    // access(2), never open(2): closing any descriptor of a file drops every
    // POSIX lock this process holds on it, and SQLite's connections in this
    // process hold such locks on the database and its -shm file. (Opening
    // and closing them here let another process's writes go unseen.)
    for suffix in ["-wal", "-shm"] {
        let mut companion = path.as_os_str().to_os_string();
        companion.push(suffix);
        let companion = PathBuf::from(companion);
        if let Err(error) = rustix::fs::access(&companion, rustix::fs::Access::WRITE_OK) {
            if matches!(error, rustix::io::Errno::ACCESS | rustix::io::Errno::PERM | rustix::io::Errno::ROFS) {
                return Err(StoreError::NotWritable { path: companion });
            }
        }
    }
    let not_writable = |what: &Path| StoreError::NotWritable { path: what.to_path_buf() };
    match rustix::fs::access(path, rustix::fs::Access::WRITE_OK).map_err(std::io::Error::from) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let folder = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let probe = folder.join(format!(".understudy-write-check-{}", std::process::id()));
            match std::fs::File::create(&probe) {
                Ok(_) => {
                    let _ = std::fs::remove_file(&probe);
                    Ok(())
                }
                Err(_) => Err(not_writable(folder)),
            }
        }
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            Err(not_writable(path))
        }
        Err(_) => Ok(()),
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
