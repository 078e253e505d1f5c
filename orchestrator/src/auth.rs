//! Who may call the HTTP API: bearer tokens, each with a name and a role, configured by the
//! operator as SHA-256 hashes (never the tokens themselves).
//!
//! The token list is text, one token per line, `#` starting a comment:
//!
//! ```text
//! # name      roles             hash of the token
//! ops-alice   operator          sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! shop        client            sha256:...
//! dashboards  viewer            sha256:...
//! demo        operator,client   sha256:...
//! ```
//!
//! A token may hold several roles (comma-separated); it may do what any of them allows.
//! `printf %s "$token" | sha256sum` gives the hash.
//!
//! Tokens are random (`scripts/run.sh` makes them with 32 random bytes), so one round of
//! SHA-256 is enough: there is nothing to guess a dictionary from. Checking a token compares
//! its hash with every entry in constant time, so neither the answer's timing nor its content
//! says how close a guess came.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads: sagas, their history, the page, the watch stream, `/stats`.
    Viewer,
    /// Places orders (`POST /orders`), and nothing else.
    Client,
    /// Everything a viewer may, and retry / skip / abort.
    Operator,
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    PlaceOrder,
    Operate,
}

impl Access {
    /// What it allows, for a refusal's message.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Read => "read sagas",
            Self::PlaceOrder => "place orders",
            Self::Operate => "retry, skip or abort sagas",
        }
    }
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Self::Viewer),
            "client" => Some(Self::Client),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Client => "client",
            Self::Operator => "operator",
        }
    }

    pub fn may(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Self::Viewer | Self::Operator, Access::Read)
                | (Self::Client, Access::PlaceOrder)
                | (Self::Operator, Access::Operate)
        )
    }
}

/// A caller the token list knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: what operator actions record as the operator.
    pub name: String,
    pub roles: Vec<Role>,
}

impl Caller {
    /// Whoever reaches an API started with `--api-open-on-loopback`: every role.
    pub fn loopback() -> Self {
        Self {
            name: "loopback".into(),
            roles: vec![Role::Viewer, Role::Client, Role::Operator],
        }
    }

    pub fn may(&self, access: Access) -> bool {
        self.roles.iter().any(|role| role.may(access))
    }

    /// The roles as the token list writes them, e.g. `operator,client`.
    pub fn roles_text(&self) -> String {
        let names: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        names.join(",")
    }
}

/// Why a token list cannot be read. Names the line, never a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenListError {
    #[error("line {line}: expected `NAME ROLES sha256:HEX`, found {fields} fields")]
    Shape { line: usize, fields: usize },
    #[error("line {line}: unknown role {role:?} (viewer, client or operator)")]
    Role { line: usize, role: String },
    #[error("line {line}: the hash must be `sha256:` and 64 hex digits")]
    Hash { line: usize },
    #[error("line {line}: the name {name:?} is used twice")]
    DuplicateName { line: usize, name: String },
    #[error("the token list names no token")]
    Empty,
}

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Entry {
    caller: Caller,
    hash: [u8; 32],
}

impl fmt::Debug for Tokens {
    /// Names and roles only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|e| (e.caller.name.as_str(), e.caller.roles_text())),
            )
            .finish()
    }
}

impl Tokens {
    /// Reads a token list (see the module's documentation). Lines may also be separated by
    /// `;`, so that a list fits in one environment variable. A list of no tokens (empty, or
    /// comments only) is a list, of no tokens: every request that needs one is refused. Only
    /// start-up refuses it ([`Tokens::non_empty`]), so that a service never starts that nobody
    /// can call by mistake; a reload to an empty list revokes every token.
    ///
    /// # Errors
    /// [`TokenListError`] naming the first line that is wrong.
    pub fn parse(text: &str) -> Result<Self, TokenListError> {
        let mut entries = Vec::new();
        let mut names = BTreeSet::new();
        for (index, raw) in text.split(['\n', ';']).enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, roles, hash] = fields[..] else {
                return Err(TokenListError::Shape {
                    line,
                    fields: fields.len(),
                });
            };
            let mut parsed_roles = roles
                .split(',')
                .map(|role| {
                    Role::parse(role).ok_or_else(|| TokenListError::Role {
                        line,
                        role: role.to_owned(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            parsed_roles.sort();
            parsed_roles.dedup();
            let hash = hash
                .strip_prefix("sha256:")
                .and_then(decode_hex)
                .ok_or(TokenListError::Hash { line })?;
            if !names.insert(name.to_owned()) {
                return Err(TokenListError::DuplicateName {
                    line,
                    name: name.to_owned(),
                });
            }
            entries.push(Entry {
                caller: Caller {
                    name: name.to_owned(),
                    roles: parsed_roles,
                },
                hash,
            });
        }
        Ok(Self { entries })
    }

    /// `self`, unless it names no token.
    ///
    /// # Errors
    /// [`TokenListError::Empty`].
    pub fn non_empty(self) -> Result<Self, TokenListError> {
        if self.entries.is_empty() {
            return Err(TokenListError::Empty);
        }
        Ok(self)
    }

    /// How many tokens the list names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller `token` belongs to. Every entry is compared, in constant time each.
    pub fn caller(&self, token: &str) -> Option<&Caller> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&entry.hash, &presented) {
                found = Some(&entry.caller);
            }
        }
        found
    }
}

/// The line of a token list for `token`.
pub fn token_line(name: &str, roles: &[Role], token: &str) -> String {
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let caller = Caller {
        name: name.to_owned(),
        roles: roles.to_vec(),
    };
    format!("{name} {} sha256:{hex}", caller.roles_text())
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(difference) == 0
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Tokens {
        let text = [
            "# the demo's tokens",
            &token_line("ops-alice", &[Role::Operator], "op-secret"),
            &token_line("shop", &[Role::Client], "client-secret"),
            "",
            &token_line("dash", &[Role::Viewer], "viewer-secret"),
            &token_line("demo", &[Role::Operator, Role::Client], "demo-secret"),
        ]
        .join("\n");
        Tokens::parse(&text).expect("valid list")
    }

    #[test]
    fn a_token_names_its_caller_and_nothing_else_does() {
        let tokens = list();
        assert_eq!(
            tokens.caller("op-secret"),
            Some(&Caller {
                name: "ops-alice".into(),
                roles: vec![Role::Operator]
            })
        );
        assert_eq!(
            tokens.caller("client-secret").map(|c| c.roles.clone()),
            Some(vec![Role::Client])
        );
        let demo = tokens.caller("demo-secret").expect("demo token");
        assert!(demo.may(Access::PlaceOrder) && demo.may(Access::Operate));
        for wrong in [
            "",
            "op-secre",
            "op-secret ",
            "OP-SECRET",
            "sha256:op-secret",
        ] {
            assert_eq!(tokens.caller(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn each_role_may_do_exactly_its_part() {
        let table = [
            (Role::Viewer, [true, false, false]),
            (Role::Client, [false, true, false]),
            (Role::Operator, [true, false, true]),
        ];
        for (role, allowed) in table {
            for (access, expected) in [Access::Read, Access::PlaceOrder, Access::Operate]
                .into_iter()
                .zip(allowed)
            {
                assert_eq!(role.may(access), expected, "{role:?} {access:?}");
            }
        }
    }

    #[test]
    fn a_wrong_list_names_the_line_and_never_a_token() {
        let good = token_line("a", &[Role::Viewer], "t");
        let cases = [
            ("a viewer", TokenListError::Shape { line: 1, fields: 2 }),
            (
                "a admin sha256:00",
                TokenListError::Role {
                    line: 1,
                    role: "admin".into(),
                },
            ),
            ("a viewer sha256:zz", TokenListError::Hash { line: 1 }),
            ("a viewer plain-token", TokenListError::Hash { line: 1 }),
            (
                "a viewer,admin sha256:00",
                TokenListError::Role {
                    line: 1,
                    role: "admin".into(),
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(Tokens::parse(text).err(), Some(expected), "{text}");
        }
        // No tokens is a list (a reload to it revokes every token); start-up refuses it.
        for nothing in ["", "# nothing", "\n \n# a; # b"] {
            let tokens = Tokens::parse(nothing).expect("an empty list parses");
            assert!(tokens.is_empty() && tokens.caller("").is_none());
            assert_eq!(tokens.non_empty().err(), Some(TokenListError::Empty));
        }
        assert_eq!(
            Tokens::parse(&format!("{good}\n{good}")).err(),
            Some(TokenListError::DuplicateName {
                line: 2,
                name: "a".into()
            })
        );
        assert!(!format!("{:?}", list()).contains("sha256"));
        let inline = format!("{good}; {}", token_line("b", &[Role::Client], "u"));
        assert_eq!(Tokens::parse(&inline).map(|t| t.entries.len()), Ok(2));
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        for header in ["Basic abc", "Bearer", "Bearer ", "abc", ""] {
            assert_eq!(bearer(header), None, "{header:?}");
        }
    }
}
