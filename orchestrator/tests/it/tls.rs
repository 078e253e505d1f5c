//! HTTPS on the API, checked with clients nobody here wrote: curl (`--cacert`, `--cert`) and
//! OpenSSL's `s_client` (which certificate is served). The certificates come from
//! `scripts/pki.sh`, a CA of the test's own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use orchestrator::config::ApiConfig;

use crate::helpers::{eventually, Options, TestSystem, VIEWER_TOKEN};

/// A CA and the API's certificate (`api`, for 127.0.0.1 and localhost), made by
/// `scripts/pki.sh` in a folder of the test's own, removed at the end.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("api-pki-{}", uuid::Uuid::new_v4()));
        testkit::pki::issue(&dir, "api");
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The API's settings for HTTPS with this certificate, read again every 200 ms.
    fn api(&self) -> ApiConfig {
        ApiConfig {
            http_tls_cert_file: Some(self.path("api.crt")),
            http_tls_key_file: Some(self.path("api.key")),
            http_tls_reload_ms: 200,
            ..ApiConfig::default()
        }
    }

    /// A deployment of the orchestrator alone, serving HTTPS with `api`.
    fn options(&self, api: ApiConfig) -> Options {
        Options {
            api,
            tls_ca: Some(self.path("ca.crt")),
            without: crate::helpers::participants_of("order")
                .iter()
                .map(participant_sdk::Participant::name)
                .collect(),
            ..Options::default()
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl with `args` and the viewer's token: its exit code and what it printed (the answer's
/// head, with `-D -`).
fn curl(args: &[&str]) -> (i32, String) {
    let output = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-D", "-", "--max-time", "10"])
        .args(["-H", &format!("Authorization: Bearer {VIEWER_TOKEN}")])
        .args(args)
        .output()
        .expect("run curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).to_lowercase()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The SHA-256 fingerprint of the certificate the server at `http` (`https://HOST:PORT`)
/// serves to a new connection, as OpenSSL's client sees it after verifying it against `ca`.
fn served_fingerprint(http: &str, ca: &Path) -> Option<String> {
    let host = http.trim_start_matches("https://");
    let served = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            host,
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    served.status.success().then_some(())?;
    fingerprint_of(&served.stdout)
}

/// The SHA-256 fingerprint of the (first) PEM certificate in `pem`.
fn fingerprint_of(pem: &[u8]) -> Option<String> {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    std::io::Write::write_all(&mut child.stdin.take()?, pem).ok()?;
    let output = child.wait_with_output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Over TLS, curl with the local CA gets the API's answers, each with
/// `Strict-Transport-Security`; without the CA it refuses the certificate, and plain HTTP on the
/// TLS port gets no answer. An API served over plain HTTP sends no `Strict-Transport-Security`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_the_local_ca_gets_https_answers_with_hsts_and_plain_http_gets_none() {
    let pki = Pki::new();
    let ca = pki.path("ca.crt").display().to_string();
    let system = TestSystem::start_with(pki.options(pki.api())).await;
    assert!(system.http.starts_with("https://"), "{}", system.http);
    for path in ["/healthz", "/sagas", "/", "/no-such-route"] {
        let url = format!("{}{path}", system.http);
        let (code, head) = curl(&["--cacert", &ca, &url]);
        assert_eq!(code, 0, "{path}: {head}");
        assert!(
            head.contains("strict-transport-security: max-age=31536000"),
            "{path}: {head}"
        );
    }
    let localhost = system.http.replace("127.0.0.1", "localhost");
    let (code, head) = curl(&["--cacert", &ca, &format!("{localhost}/healthz")]);
    assert!(
        code == 0 && head.starts_with("http/1.1 200"),
        "the certificate names localhost too: {head}"
    );

    // Without the CA, curl does not trust the certificate (60: the peer's certificate cannot
    // be verified with the known CAs).
    let (code, text) = curl(&[&format!("{}/healthz", system.http)]);
    assert_eq!(code, 60, "{text}");
    // Plain HTTP to the TLS port: no HTTP answer (rustls answers with a TLS alert, which curl
    // reads as an HTTP/0.9 reply it refuses).
    let plain = system.http.replace("https://", "http://");
    let (code, text) = curl(&[&format!("{plain}/healthz")]);
    assert!(code != 0 && !text.contains("http/1.1"), "{code}: {text}");
    system.stop().await;

    let plain = TestSystem::start_with(Options {
        without: crate::helpers::participants_of("order")
            .iter()
            .map(participant_sdk::Participant::name)
            .collect(),
        ..Options::default()
    })
    .await;
    let (code, head) = curl(&[&format!("{}/healthz", plain.http)]);
    assert!(code == 0 && head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("strict-transport-security"),
        "no HSTS over plain HTTP: {head}"
    );
    plain.stop().await;
}

/// A certificate renewed in place (`scripts/pki.sh renew`) is served to new connections
/// without a restart; files that stop making a configuration keep the renewed one in force, and
/// `/metrics` says the files are stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let pki = Pki::new();
    let ca = pki.path("ca.crt");
    let system = TestSystem::start_with(pki.options(pki.api())).await;
    let first = fingerprint_of(&std::fs::read(pki.path("api.crt")).expect("the certificate"))
        .expect("a fingerprint");
    assert_eq!(
        served_fingerprint(&system.http, &ca).as_deref(),
        Some(first.as_str())
    );

    testkit::pki::renew(&pki.dir, "api");
    let renewed = fingerprint_of(&std::fs::read(pki.path("api.crt")).expect("the certificate"))
        .expect("a fingerprint");
    assert_ne!(first, renewed, "pki.sh renew made a new certificate");
    eventually("the renewed certificate to be served", || async {
        (served_fingerprint(&system.http, &ca).as_deref() == Some(renewed.as_str())).then_some(())
    })
    .await;
    let (code, head) = curl(&[
        "--cacert",
        &ca.display().to_string(),
        &format!("{}/healthz", system.http),
    ]);
    assert!(code == 0 && head.starts_with("http/1.1 200"), "{head}");

    // A key that is not the certificate's: refused, the renewed pair stays in force.
    let other = Pki::new();
    std::fs::copy(other.path("api.key"), pki.path("api.key")).expect("replace the key");
    eventually("/metrics to say the TLS files are stale", || async {
        let (status, _, text) = system.get_text("/metrics").await;
        (status == 200
            && text
                .lines()
                .any(|line| line.starts_with("http_tls_stale{") && line.ends_with(" 1")))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_fingerprint(&system.http, &ca).as_deref(),
        Some(renewed.as_str()),
        "the certificate in force stays"
    );
    system.stop().await;
}

/// With a client CA (mutual TLS), curl gets in with a certificate that CA signed, and is
/// refused in the handshake without one or with one of another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_its_certificates_get_in() {
    let pki = Pki::new();
    let (client_cert, client_key) = testkit::pki::issue(&pki.dir, "machine-client");
    let api = ApiConfig {
        http_tls_client_ca_file: Some(pki.path("ca.crt")),
        ..pki.api()
    };
    let system = TestSystem::start_with(Options {
        tls_identity: Some((client_cert.clone(), client_key.clone())),
        ..pki.options(api)
    })
    .await;
    let ca = pki.path("ca.crt").display().to_string();
    let url = format!("{}/healthz", system.http);
    // curl showing the certificate `cert` with its key.
    let curl_as = |(cert, key): &(PathBuf, PathBuf)| {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        curl(&["--cacert", &ca, "--cert", &cert, "--key", &key, &url])
    };
    let (code, head) = curl_as(&(client_cert, client_key));
    assert!(code == 0 && head.starts_with("http/1.1 200"), "{head}");

    let (code, text) = curl(&["--cacert", &ca, &url]);
    assert_ne!(code, 0, "no client certificate: refused: {text}");
    let stranger = testkit::pki::OtherCa::new();
    let (code, text) = curl_as(&stranger.issue("stranger"));
    assert_ne!(code, 0, "another CA's certificate: refused: {text}");
    system.stop().await;
}
