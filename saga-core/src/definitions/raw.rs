//! The file format, as serde reads it (and writes the canonical form).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Saga {
    pub name: String,
    pub version: i64,
    pub pivot: Option<String>,
    pub trigger: Trigger,
    #[serde(default)]
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Trigger {
    pub topic: String,
    pub message: String,
    pub key: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Step {
    pub name: String,
    pub participant: String,
    pub topic: String,
    pub forward: Action,
    pub compensation: Option<Action>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Action {
    pub action: String,
    #[serde(default)]
    pub payload: BTreeMap<String, String>,
    pub success: String,
    pub failure: Option<String>,
    pub retry: Retry,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Retry {
    pub timeout_ms: u64,
    pub max_attempts: Option<u32>,
    pub max_timeout_ms: u64,
}
