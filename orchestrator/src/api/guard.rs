//! What every request passes before a handler sees it: the `Host`/`Origin` check (a page
//! elsewhere cannot drive the API through a visitor's browser), and per route the bearer
//! token and the access its role grants.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ApiError;
use crate::auth::{self, Access, Caller, Tokens};
use crate::config::{read_token_file, ApiConfig, Gate};

/// Who may call, and from where.
#[derive(Debug)]
pub struct Guard {
    /// Replaced whole when the token file changes ([`Guard::replace_gate`]).
    gate: RwLock<Gate>,
    /// Lower-case host names (no port) the API answers to; `None`: any.
    allowed_hosts: Option<Vec<String>>,
    /// Origins besides the API's own, without a trailing `/`.
    allowed_origins: Vec<String>,
    /// Each token's request rate, by token name; `None`: no limit (none configured, or an API
    /// open on loopback, which has no tokens: a reload never turns it into one that has).
    rates: Option<DefaultKeyedRateLimiter<String>>,
}

impl Guard {
    pub fn new(gate: Gate, config: &ApiConfig, http_addr: SocketAddr) -> Self {
        let allowed_hosts = if !config.api_allowed_hosts.is_empty() {
            Some(
                config
                    .api_allowed_hosts
                    .iter()
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect(),
            )
        } else if http_addr.ip().is_loopback() {
            Some(vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()])
        } else {
            None
        };
        let rates = NonZeroU32::new(config.api_rate_limit_per_sec)
            .filter(|_| matches!(gate, Gate::Tokens(_)))
            .map(|per_sec| {
                let burst = NonZeroU32::new(config.api_rate_limit_burst).unwrap_or(per_sec);
                RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst))
            });
        Self {
            rates,
            gate: RwLock::new(gate),
            allowed_hosts,
            allowed_origins: config
                .api_allowed_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }

    /// The answer (429, with how long to wait) when `caller` made more requests than its rate
    /// allows.
    fn rate_limited(&self, caller: &Caller) -> Option<Response> {
        let rates = self.rates.as_ref()?;
        let not_until = rates.check_key(&caller.name).err()?;
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "the token {:?} made more requests than API_RATE_LIMIT_PER_SEC allows; \
                 try again in {retry_after} s",
                caller.name
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
        Some(response)
    }

    /// From now on, callers are told apart by `gate` (a reloaded token list).
    pub fn replace_gate(&self, gate: Gate) {
        *self.gate.write().unwrap_or_else(PoisonError::into_inner) = gate;
    }

    /// The caller a request's `Authorization` header names.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        // A writer panicking mid-assignment cannot leave a half-written gate: the value is
        // replaced whole, so a poisoned lock still holds a complete one.
        let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let tokens = match &*gate {
            Gate::OpenOnLoopback => return Ok(Caller::loopback()),
            Gate::Tokens(tokens) => tokens,
        };
        let unauthorized = |message: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message.to_owned())
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(auth::bearer)
            .ok_or_else(|| unauthorized("send `Authorization: Bearer <token>`"))?;
        tokens
            .caller(token)
            .cloned()
            .ok_or_else(|| unauthorized("unknown token"))
    }

    /// `Err` with the reason when the request's `Host` or `Origin` is not this API's.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if let Some(allowed) = &self.allowed_hosts {
            let name = host_name(host).to_ascii_lowercase();
            if !allowed.contains(&name) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "host_not_allowed",
                    "this API does not answer to that host name (see API_ALLOWED_HOSTS)",
                ));
            }
        }
        // Browsers send `Origin` on cross-origin requests and on every POST; tools send none.
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
        let same_origin = ["http://", "https://"]
            .iter()
            .any(|scheme| origin.strip_prefix(scheme) == Some(host) && !host.is_empty());
        if same_origin || self.allowed_origins.iter().any(|o| o == origin) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "requests from this origin are not allowed (see API_ALLOWED_ORIGINS)",
            ))
        }
    }
}

/// Token file reloads that failed (the file could not be read or parsed), by `file`: each one
/// left the list before it in force.
pub const TOKEN_RELOAD_FAILURES: &str = "api_token_reload_failures_total";
/// 1 while the token list in force is not the token file's (its last read or parse failed),
/// else 0, by `file`.
pub const TOKENS_STALE: &str = "api_tokens_stale";
/// The tokens in force.
pub const TOKENS_IN_FORCE: &str = "api_tokens";

pub fn describe_metrics() {
    metrics::describe_counter!(
        TOKEN_RELOAD_FAILURES,
        "Token file reloads that failed (unreadable or invalid); the list before stays in force."
    );
    metrics::describe_gauge!(
        TOKENS_STALE,
        "1 while the API token list in force is not the token file's, else 0."
    );
    metrics::describe_gauge!(TOKENS_IN_FORCE, "API tokens in force.");
}

/// Reads the token file at `path` every `every` until `shutdown`; when its text changed (and
/// reads the same a moment later: not half-written) and parses, `guard` takes the new list, an empty one too (every token revoked: emptying
/// the file is how an operator revokes them all). A file that cannot be read or parsed keeps
/// the list before it in force, so that a typo in an edit neither locks every caller out nor
/// stops the service; but loudly: an error at every reload while it lasts, a count of failed
/// reloads and a gauge saying the list in force is stale.
pub async fn reload_tokens(
    guard: Arc<Guard>,
    path: PathBuf,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // What the gate was built from (read again here: the start-up read was a moment ago).
    // Labels the metrics: which file is stale.
    let file = path.display().to_string();
    let mut in_force = read_token_file(&path).ok();
    metrics::gauge!(TOKENS_STALE, "file" => file.clone()).set(0.0);
    if let Some(Ok(tokens)) = in_force.as_deref().map(Tokens::parse) {
        set_tokens_in_force(tokens.len());
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let failure = match read_token_file(&path) {
            Err(e) => messaging::chain(&e),
            Ok(text) if in_force.as_deref() == Some(text.as_str()) => {
                metrics::gauge!(TOKENS_STALE, "file" => file.clone()).set(0.0);
                continue;
            }
            // Written in place (truncated, then written), a file may be read half-written or
            // empty, which would revoke tokens for a moment, or for good when the edit itself
            // is broken. So a change is taken only once it reads the same twice, a moment
            // apart; until then the list in force stays.
            Ok(text) if !settled(&path, &text).await => continue,
            Ok(text) => match Tokens::parse(&text) {
                Ok(tokens) => {
                    let count = tokens.len();
                    guard.replace_gate(Gate::Tokens(tokens));
                    metrics::gauge!(TOKENS_STALE, "file" => file.clone()).set(0.0);
                    set_tokens_in_force(count);
                    if count == 0 {
                        tracing::warn!(path = %path.display(), "the API token file names no token: every token is revoked");
                    } else {
                        tracing::info!(path = %path.display(), tokens = count, "API tokens reloaded");
                    }
                    in_force = Some(text);
                    continue;
                }
                Err(e) => format!("{}: {}", path.display(), messaging::chain(&e)),
            },
        };
        metrics::counter!(TOKEN_RELOAD_FAILURES, "file" => file.clone()).increment(1);
        metrics::gauge!(TOKENS_STALE, "file" => file.clone()).set(1.0);
        tracing::error!(error.message = %failure, "the API token file cannot be used; the tokens before it stay in force");
    }
}

/// How long a changed token file must stay the same before it is taken.
const TOKEN_FILE_SETTLE: Duration = Duration::from_millis(100);

/// Whether the file at `path` still reads `text` after [`TOKEN_FILE_SETTLE`].
async fn settled(path: &std::path::Path, text: &str) -> bool {
    tokio::time::sleep(TOKEN_FILE_SETTLE).await;
    read_token_file(path).is_ok_and(|again| again == text)
}

#[allow(clippy::cast_precision_loss)] // a count of tokens
fn set_tokens_in_force(count: usize) {
    metrics::gauge!(TOKENS_IN_FORCE).set(count as f64);
}

/// `localhost` of `localhost:8080`, `[::1]` of `[::1]:8080`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.split(':').next().unwrap_or(host)
}

/// Middleware for every route: the `Host`/`Origin` check.
pub async fn same_origin(
    State(guard): State<std::sync::Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    match guard.check_origin(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// Middleware for a route that needs `access`: 401 without a known token, 429 past the token's
/// rate, 403 when its roles do not grant it. The handler finds the [`Caller`] among the request's extensions.
pub async fn require(
    State((guard, access)): State<(std::sync::Arc<Guard>, Access)>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match guard.caller(request.headers()) {
        Ok(caller) => caller,
        Err(refused) => {
            let mut response = refused.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    // Every request of a known token counts, the ones its roles refuse too.
    if let Some(limited) = guard.rate_limited(&caller) {
        return limited;
    }
    if !caller.may(access) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the token {:?} ({}) may not {}",
                caller.name,
                caller.roles_text(),
                access.describe()
            ),
        )
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str], origins: &[&str], addr: &str) -> Guard {
        let config = ApiConfig {
            api_allowed_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            api_allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            ..ApiConfig::default()
        };
        Guard::new(
            Gate::OpenOnLoopback,
            &config,
            addr.parse().expect("address"),
        )
    }

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        if let Some(origin) = origin {
            headers.insert(
                header::ORIGIN,
                HeaderValue::from_str(origin).expect("origin"),
            );
        }
        headers
    }

    #[test]
    fn on_loopback_only_loopback_names_and_the_own_origin_pass() {
        let guard = guard(&[], &[], "127.0.0.1:8080");
        for (host, origin, allowed) in [
            ("localhost:8080", None, true),
            ("127.0.0.1:8080", Some("http://127.0.0.1:8080"), true),
            ("[::1]:8080", None, true),
            ("LOCALHOST:8080", None, true),
            // A name that a page elsewhere rebound to 127.0.0.1.
            ("attacker.example:8080", None, false),
            ("", None, false),
            ("localhost:8080", Some("http://attacker.example"), false),
            ("localhost:8080", Some("http://localhost:9999"), false),
            ("localhost:8080", Some("null"), false),
        ] {
            assert_eq!(
                guard.check_origin(&headers(host, origin)).is_ok(),
                allowed,
                "{host} {origin:?}"
            );
        }
    }

    #[test]
    fn configured_hosts_and_origins_widen_or_narrow_the_defaults() {
        let open = guard(&[], &[], "0.0.0.0:8080");
        assert!(open
            .check_origin(&headers("sagas.internal:8080", None))
            .is_ok());
        let listed = guard(
            &["sagas.internal"],
            &["https://ops.example.com/"],
            "0.0.0.0:8080",
        );
        assert!(listed
            .check_origin(&headers("sagas.internal", None))
            .is_ok());
        assert!(listed.check_origin(&headers("localhost", None)).is_err());
        assert!(listed
            .check_origin(&headers("sagas.internal", Some("https://ops.example.com")))
            .is_ok());
        assert!(listed
            .check_origin(&headers("sagas.internal", Some("https://evil.example.com")))
            .is_err());
    }
}
