//! Helpers for tests that need a real store: a fresh Postgres database per
//! test, created on the server from `UNDERSTUDY_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`).

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

pub const DEFAULT_TEST_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The admin URL tests create databases through.
pub fn admin_url() -> String {
    std::env::var("UNDERSTUDY_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_POSTGRES_URL.to_string())
}

/// A database that exists for one test and is dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    pub url: String,
    name: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database. Errors if Postgres is unreachable:
    /// the store's suite must run against both backends.
    pub async fn create() -> Result<TestDatabase, sqlx::Error> {
        let admin_url = admin_url();
        let name = format!("understudy_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&admin_url).await?;
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await?;
        admin.close().await?;
        let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _db)| base);
        Ok(TestDatabase { url: format!("{base}/{name}"), name })
    }

    pub async fn drop_database(self) -> Result<(), sqlx::Error> {
        let mut admin = PgConnection::connect(&admin_url()).await?;
        admin.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str()).await?;
        admin.close().await
    }
}
