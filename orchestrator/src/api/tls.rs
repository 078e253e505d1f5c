//! HTTPS for the API: rustls (with ring, the provider sqlx's TLS already brings) over the
//! certificate and key named by `HTTP_TLS_CERT_FILE` and `HTTP_TLS_KEY_FILE`, and, with
//! `HTTP_TLS_CLIENT_CA_FILE`, mutual TLS: every client shows a certificate that CA signed.
//!
//! The files are read again every `HTTP_TLS_RELOAD_MS`, as the token file is
//! (`guard::reload_tokens`): a renewed certificate is served to every connection that starts
//! after the reload, without a restart, while the connections open keep the one they began
//! with. A change is taken once the files read the same twice, a moment apart (a certificate
//! and its key are two files, written one after the other); files that cannot be read or do not
//! make a configuration (a key that is not the certificate's, say) keep the one in force, with
//! an error at every reload while it lasts, `http_tls_reload_failures_total` counted and
//! `http_tls_stale` at 1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// `Strict-Transport-Security` on every answer served over TLS: browsers that saw it use
/// HTTPS for this host for a year. Without `includeSubDomains`: other services under this
/// host's name are not this server's to decide for.
pub const HSTS: &str = "max-age=31536000";

/// Reloads of the TLS files that failed, by `file` (the certificate's path): each one left the
/// certificate before it in force.
pub const TLS_RELOAD_FAILURES: &str = "http_tls_reload_failures_total";
/// 1 while the certificate served is not the files' (their last read or parse failed), else 0,
/// by `file`.
pub const TLS_STALE: &str = "http_tls_stale";

pub fn describe_metrics() {
    metrics::describe_counter!(
        TLS_RELOAD_FAILURES,
        "Reloads of HTTP_TLS_CERT_FILE / HTTP_TLS_KEY_FILE that failed; the certificate before stays in force."
    );
    metrics::describe_gauge!(
        TLS_STALE,
        "1 while the API's certificate in force is not the one in its files, else 0."
    );
}

/// Why the TLS files do not make a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no {what} in PEM", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} and {} do not make a TLS server configuration", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the client CA file {} cannot verify client certificates", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// Where the certificate, its key and the client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must show a certificate this CA signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The files' bytes, to tell a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            client_ca: self.client_ca.as_deref().map(read).transpose()?,
        })
    }

    /// The server configuration `contents` (read from these files) make.
    fn configure(&self, contents: &Contents) -> Result<ServerConfig, TlsError> {
        fn pem<'a>(
            path: &'a Path,
            what: &'static str,
        ) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + 'a {
            move |source| TlsError::Pem {
                path: path.to_owned(),
                what,
                source,
            }
        }
        let chain = certificates(&contents.cert).map_err(pem(&self.cert, "certificate"))?;
        let key =
            PrivateKeyDer::from_pem_slice(&contents.key).map_err(pem(&self.key, "private key"))?;
        let provider = Arc::new(provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| self.config_error(source))?;
        let builder = match (&self.client_ca, &contents.client_ca) {
            (Some(path), Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(ca).map_err(pem(path, "CA certificate"))? {
                    roots
                        .add(cert)
                        .map_err(|source| self.config_error(source))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|source| TlsError::ClientCa {
                        path: path.clone(),
                        source,
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|source| self.config_error(source))?;
        // The server speaks HTTP/1.1 only (`server.rs`).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    fn config_error(&self, source: rustls::Error) -> TlsError {
        TlsError::Config {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }
}

/// rustls's ring provider: deprecated since 0.23.48 for lacking post-quantum key exchange,
/// which only aws-lc-rs offers; ring is what sqlx's TLS builds already, aws-lc-rs would be a
/// second C crypto library in every build. Revisit when ring gains ML-KEM.
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Every certificate in `pem`, at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    let chain = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err(rustls_pki_types::pem::Error::NoItemsFound);
    }
    Ok(chain)
}

/// The server configuration in force, replaced whole by a reload.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    current: RwLock<(Contents, Arc<ServerConfig>)>,
}

impl Tls {
    /// Reads the files and makes their configuration.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that cannot be read or used.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let contents = files.read()?;
        let config = Arc::new(files.configure(&contents)?);
        Ok(Self {
            files,
            current: RwLock::new((contents, config)),
        })
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.read().1.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Contents, Arc<ServerConfig>)> {
        // Replaced whole: a poisoned lock still holds a complete pair.
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the files every `every` until `shutdown`, and takes what changed (see the
    /// module's documentation).
    pub async fn reload(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let file = self.files.cert.display().to_string();
        metrics::gauge!(TLS_STALE, "file" => file.clone()).set(0.0);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let failure = match self.files.read() {
                Err(e) => e,
                Ok(contents) if contents == self.read().0 => {
                    metrics::gauge!(TLS_STALE, "file" => file.clone()).set(0.0);
                    continue;
                }
                Ok(contents) if !self.settled(&contents).await => continue,
                Ok(contents) => match self.files.configure(&contents) {
                    Ok(config) => {
                        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                            (contents, Arc::new(config));
                        metrics::gauge!(TLS_STALE, "file" => file.clone()).set(0.0);
                        tracing::info!(cert = %self.files.cert.display(), "the API's TLS certificate reloaded");
                        continue;
                    }
                    Err(e) => e,
                },
            };
            metrics::counter!(TLS_RELOAD_FAILURES, "file" => file.clone()).increment(1);
            metrics::gauge!(TLS_STALE, "file" => file.clone()).set(1.0);
            tracing::error!(error.message = %messaging::Chain(&failure), "the API's TLS files cannot be used; the certificate before them stays in force");
        }
    }

    /// Whether the files still read `contents` a moment later (not half-written, nor a
    /// certificate written without its key yet).
    async fn settled(&self, contents: &Contents) -> bool {
        tokio::time::sleep(FILES_SETTLE).await;
        self.files.read().is_ok_and(|again| &again == contents)
    }
}

/// How long changed TLS files must stay the same before they are taken.
const FILES_SETTLE: Duration = Duration::from_millis(100);
