//! The service roles of a test: what the admin step (`messaging::provision`) makes for a
//! deployment, named with a prefix of the test's own.

use messaging::provision::{self, ServiceRole};
use sqlx::PgPool;

use crate::{cleanup, server_url, unique_id};

/// The CA that signed the PostgreSQL server's certificate: `TEST_DATABASE_CA`, or else the
/// file the server trusts (`ssl_ca_file`; `scripts/postgres.sh` sets it to the local CA that
/// signed the server's certificate).
///
/// # Panics
/// When there is none this test can read.
pub async fn server_ca(admin: &PgPool) -> String {
    let ca = match std::env::var("TEST_DATABASE_CA") {
        Ok(path) => path,
        Err(_) => sqlx::query_scalar("SELECT current_setting('ssl_ca_file')")
            .fetch_one(admin)
            .await
            .expect("the server's ssl_ca_file"),
    };
    assert!(
        !ca.is_empty() && std::path::Path::new(&ca).exists(),
        "the server trusts no CA file this test can read ({ca:?}): run scripts/postgres.sh \
         start, or set TEST_DATABASE_CA"
    );
    ca
}

/// A login role per service (`t<id>_<service>`, members of the service group, each with a
/// password), made by the admin step for one test and dropped when this is dropped: after the
/// test's databases, which hold what the roles own (drop those first).
#[derive(Debug)]
pub struct TestRoles {
    roles: Vec<ServiceRole>,
    /// The CA file the services verify the server with.
    ca: String,
    host: String,
    port: u16,
}

impl TestRoles {
    /// Creates the roles of `services` with `admin`, a pool on the server as its superuser.
    ///
    /// # Panics
    /// When the admin step fails or the server trusts no CA the test can read.
    pub async fn create(admin: &PgPool, services: &[&str]) -> Self {
        let prefix = format!("t{}_", unique_id(10));
        let roles = provision::create_roles(admin, &prefix, services, |_| None)
            .await
            .expect("the admin step creates the roles");
        let ca = server_ca(admin).await;
        let server: sqlx::postgres::PgConnectOptions =
            server_url().parse().expect("TEST_DATABASE_URL");
        Self {
            roles,
            ca,
            // verify-full checks the certificate against the name the client connects to: the
            // local CA's certificate names both 127.0.0.1 and localhost.
            host: server.get_host().to_owned(),
            port: server.get_port(),
        }
    }

    /// Every role, in the order of the services.
    pub fn all(&self) -> &[ServiceRole] {
        &self.roles
    }

    /// `service`'s role.
    pub fn role(&self, service: &str) -> Option<&ServiceRole> {
        self.roles.iter().find(|r| r.service == service)
    }

    /// The CA file the server's certificate is verified against.
    pub fn ca(&self) -> &str {
        &self.ca
    }

    /// `service`'s URL of `database` as a deployment gives it: its role with its password,
    /// verify-full against the server's CA.
    ///
    /// # Panics
    /// When `service` has no role here.
    pub fn url(&self, service: &str, database: &str) -> String {
        let password = self.password(service);
        self.url_with(service, database, Some(&password), &self.verify_full())
    }

    /// Like [`Self::url`] without the password, which comes from a password file
    /// (`PGPASSFILE`).
    ///
    /// # Panics
    /// When `service` has no role here.
    pub fn url_without_password(&self, service: &str, database: &str) -> String {
        self.url_with(service, database, None, &self.verify_full())
    }

    /// `service`'s URL of `database` with `password` and the TLS `parameters`.
    ///
    /// # Panics
    /// When `service` has no role here.
    pub fn url_with(
        &self,
        service: &str,
        database: &str,
        password: Option<&str>,
        parameters: &str,
    ) -> String {
        let role = &self.known(service).role;
        let password = password.map(|p| format!(":{p}")).unwrap_or_default();
        format!(
            "postgres://{role}{password}@{}:{}/{database}?{parameters}",
            self.host, self.port
        )
    }

    fn password(&self, service: &str) -> String {
        self.known(service).password.clone()
    }

    fn known(&self, service: &str) -> &ServiceRole {
        self.role(service)
            .unwrap_or_else(|| panic!("{service} has no role in this test"))
    }

    fn verify_full(&self) -> String {
        format!("sslmode=verify-full&sslrootcert={}", self.ca)
    }
}

impl Drop for TestRoles {
    fn drop(&mut self) {
        let roles = self.roles.clone();
        cleanup::as_admin("the test's roles".into(), |admin| async move {
            if let Err(e) = provision::drop_roles(&admin, &roles).await {
                eprintln!("dropping the test's roles failed: {e}");
            }
        });
    }
}
