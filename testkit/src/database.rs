//! A database of a test's own.

use crate::{admin, cleanup, server_url, unique_id};

/// A database of a test's own, created on the test server and dropped (its sessions ended
/// with it) when this is dropped, whether the test passed or not.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
}

impl TestDatabase {
    /// Creates the database `{label}_{a fresh id}`.
    ///
    /// # Panics
    /// When the server cannot be reached or refuses the database.
    pub async fn create(label: &str) -> Self {
        Self::create_named(format!("{label}_{}", unique_id(12))).await
    }

    /// Creates the database `name` (a name no other test uses).
    ///
    /// # Panics
    /// When the server cannot be reached or refuses the database.
    pub async fn create_named(name: String) -> Self {
        let admin = admin("postgres").await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("create the test database {name}: {e}"));
        admin.close().await;
        Self { name }
    }

    /// Takes on the clean-up of the database `name`, which something else (the program under
    /// test) creates.
    pub fn adopt(name: String) -> Self {
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL, as the superuser.
    pub fn url(&self) -> String {
        format!("{}/{}", server_url(), self.name)
    }

    /// A pool of one connection to it as the superuser.
    pub async fn admin(&self) -> sqlx::PgPool {
        admin(&self.name).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        cleanup::as_admin(name.clone(), |admin| async move {
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(e) = sqlx::query(&drop).execute(&admin).await {
                eprintln!("dropping {name} failed: {e}");
            }
        });
    }
}
