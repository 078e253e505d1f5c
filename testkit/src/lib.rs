//! The test kit: what the tests of several crates share, so each crate's tests say only what
//! they test. A dev-dependency only; nothing here is part of a service.
//!
//! - [`TestDatabase`]: a database of a test's own, dropped when the test ends (also when it
//!   fails).
//! - [`TestTopics`]: a topic prefix of a test's own, its client settings, and its topics
//!   deleted when the test ends; [`read_from_start`] reads a topic from its beginning.
//! - [`TestRoles`]: the admin step's service roles for a test, named with a prefix of its own,
//!   their TLS URLs, dropped when the test ends.
//! - [`Services`]: services running as tasks of the test's process, stopped one by one or all
//!   together; [`participants`] has every participant of the repository by name.
//! - [`pki`]: certificates from the repository's `scripts/pki.sh`: another CA, a client's.
//! - [`eventually`]: waiting for what the services do.
//! - [`CutProxy`]: a TCP proxy that cuts a service's link (to its database, say) the way a
//!   network partition does, and heals it.
//!
//! Environment: `KAFKA_BROKERS` (default 127.0.0.1:9092) and `TEST_DATABASE_URL`, a server URL
//! without a database name (default postgres://postgres@127.0.0.1:5432), as the superuser.

mod cleanup;
mod database;
pub mod participants;
pub mod pki;
mod ports;
mod proxy;
mod roles;
mod services;
mod topics;
mod wait;

use std::path::PathBuf;

pub use database::TestDatabase;
pub use ports::{free_addr, free_port, free_port_pair};
pub use proxy::CutProxy;
pub use roles::{server_ca, TestRoles};
pub use services::Services;
pub use topics::{kafka_config, read_from_start, TestTopics};
pub use wait::{eventually, eventually_within};

/// The broker the tests use: `KAFKA_BROKERS`, default the local one.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The PostgreSQL server the tests use, as its superuser and without a database name:
/// `TEST_DATABASE_URL`, default the local one.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The repository's root folder.
pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The repository's saga definitions (`sagas/`).
pub fn sagas_dir() -> PathBuf {
    repository().join("sagas")
}

/// A fresh id of `length` hexadecimal digits, to name what a test makes (databases, roles,
/// topic prefixes) so that tests running together never meet.
pub fn unique_id(length: usize) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..length.min(id.len())].to_owned()
}

/// A pool of one connection to `database` as the server's superuser.
///
/// # Panics
/// When the server cannot be reached: the test cannot run.
pub async fn admin(database: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/{database}", server_url()))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL reachable as its superuser ({database}): {e}"))
}
