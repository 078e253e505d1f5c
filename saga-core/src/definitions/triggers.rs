//! The messages that can start a saga, and what they look like, for checking paths at load
//! time. What a trigger message looks like is read from its JSON Schema, the contract's
//! (`events/contract/schemas/`): its fields (a [`Shape`]) and a valid sample (the schema's
//! first `examples` entry). The trigger messages themselves are the contract's
//! (`events::SAGA_TRIGGERS`): a new one is registered there, not here.

use std::sync::{LazyLock, OnceLock};

use serde_json::{Map, Value};

/// The shape of a trigger message's field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Text,
    Integer,
    Object(Vec<(String, Shape)>),
    List(Box<Shape>),
}

impl Shape {
    pub(super) fn is_scalar(&self) -> bool {
        matches!(self, Self::Text | Self::Integer)
    }

    pub(super) fn field(&self, name: &str) -> Option<&Shape> {
        match self {
            Self::Object(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, s)| s),
            _ => None,
        }
    }

    /// The shape the JSON Schema `schema` describes (`at` names where, for errors), with
    /// `common` the schema its `common.schema.json#/$defs/...` references name. A top-level
    /// object's `type` property (the message's tag, not a field a definition may name) is
    /// left out.
    fn of_schema(schema: &Value, common: &Value, at: &str) -> Result<Shape, SchemaError> {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let resolved = reference
                .strip_prefix("common.schema.json#/$defs/")
                .and_then(|name| common.get("$defs")?.get(name))
                .ok_or_else(|| SchemaError::UnresolvedReference {
                    at: at.to_owned(),
                    reference: reference.to_owned(),
                })?;
            return Self::of_schema(resolved, common, at);
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("string") => Ok(Self::Text),
            Some("integer") => Ok(Self::Integer),
            Some("array") => {
                let items = schema.get("items").ok_or_else(|| unsupported(at))?;
                let item = Self::of_schema(items, common, &format!("{at}[]"))?;
                Ok(Self::List(Box::new(item)))
            }
            Some("object") => {
                let properties = schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .ok_or_else(|| unsupported(at))?;
                properties
                    .iter()
                    .filter(|(name, _)| at != "$" || *name != "type")
                    .map(|(name, property)| {
                        let shape = Self::of_schema(property, common, &format!("{at}.{name}"))?;
                        Ok((name.clone(), shape))
                    })
                    .collect::<Result<_, _>>()
                    .map(Self::Object)
            }
            _ => Err(unsupported(at)),
        }
    }
}

fn unsupported(at: &str) -> SchemaError {
    SchemaError::Unsupported { at: at.to_owned() }
}

/// Why a trigger message's JSON Schema could not be read as a [`Shape`] and a sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("not JSON at line {line}, column {column}")]
    NotJson { line: usize, column: usize },
    #[error("{at}: not a string, an integer, an array of one schema or an object with properties")]
    Unsupported { at: String },
    #[error("{at}: the reference {reference:?} is not one of common.schema.json's $defs")]
    UnresolvedReference { at: String, reference: String },
    #[error("no examples: the first one is the sample message")]
    NoExample,
}

/// What a trigger message's schema says, read once.
#[derive(Debug)]
struct Described {
    shape: Shape,
    sample: Value,
}

impl Described {
    fn read(schema: &str) -> Result<Self, SchemaError> {
        let parse = |text: &str| {
            serde_json::from_str::<Value>(text).map_err(|e| SchemaError::NotJson {
                line: e.line(),
                column: e.column(),
            })
        };
        let schema = parse(schema)?;
        let common = parse(events::COMMON_SCHEMA)?;
        Ok(Self {
            shape: Shape::of_schema(&schema, &common, "$")?,
            sample: schema
                .get("examples")
                .and_then(|examples| examples.get(0))
                .cloned()
                .ok_or(SchemaError::NoExample)?,
        })
    }
}

/// A message that can start a saga: the contract's [`events::SagaTrigger`] (its name, schema,
/// decoder and summary fields, which this derefs to) and what the engine reads of its schema,
/// read once, when first asked.
#[derive(Debug)]
pub struct TriggerMessage {
    trigger: events::SagaTrigger,
    described: OnceLock<Result<Described, SchemaError>>,
}

impl std::ops::Deref for TriggerMessage {
    type Target = events::SagaTrigger;

    fn deref(&self) -> &events::SagaTrigger {
        &self.trigger
    }
}

impl From<events::SagaTrigger> for TriggerMessage {
    fn from(trigger: events::SagaTrigger) -> Self {
        Self {
            trigger,
            described: OnceLock::new(),
        }
    }
}

impl TriggerMessage {
    fn described(&self) -> Result<&Described, &SchemaError> {
        self.described
            .get_or_init(|| Described::read(self.schema))
            .as_ref()
    }

    /// Its fields as JSON (the `type` tag aside), from its schema.
    ///
    /// # Errors
    /// When the schema is not one [`Shape`] can describe (a test reads every one).
    pub fn shape(&self) -> Result<&Shape, &SchemaError> {
        self.described().map(|d| &d.shape)
    }

    /// A valid message with every field of [`Self::shape`] (its schema's first example), for
    /// building each command of a definition once at load time.
    ///
    /// # Errors
    /// As [`Self::shape`], or when the schema has no example.
    pub fn sample(&self) -> Result<Value, &SchemaError> {
        self.described().map(|d| d.sample.clone())
    }

    /// The `SagaStarted` subject of `trigger`: the [`Self::summary`] fields it has.
    pub fn summary_of(&self, trigger: &Value) -> Map<String, Value> {
        self.summary
            .iter()
            .filter_map(|field| Some(((*field).to_owned(), trigger.get(field)?.clone())))
            .collect()
    }
}

/// The messages a saga can be triggered by: the contract's (`events::SAGA_TRIGGERS`), each
/// with its schema read once, when first asked.
pub static TRIGGER_MESSAGES: LazyLock<Vec<TriggerMessage>> = LazyLock::new(|| {
    events::SAGA_TRIGGERS
        .iter()
        .copied()
        .map(TriggerMessage::from)
        .collect()
});

/// The trigger message named `message`, if there is one.
pub fn trigger_message(message: &str) -> Option<&'static TriggerMessage> {
    TRIGGER_MESSAGES.iter().find(|m| m.name == message)
}

/// A trigger message a client may publish for a saga type: the message as its type writes
/// itself (what goes on the trigger topic) and the saga's key (the record's key).
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedTrigger {
    pub message: Value,
    pub key: String,
}

/// Why a trigger message is not one a saga type can start with.
#[derive(Debug, thiserror::Error)]
pub enum TriggerRefused {
    #[error("the engine knows no trigger message {0}")]
    UnknownMessage(String),
    #[error("not a JSON object: a {message} message")]
    NotAnObject { message: String },
    #[error("`type` must be {expected:?} (or left out), not {found}")]
    OtherType { expected: String, found: Value },
    #[error("the message cannot be written as JSON")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Contract(events::ContractError),
    #[error(transparent)]
    Key(super::PayloadError),
}

impl super::Trigger {
    /// Checks `message` (JSON from a client: its `type` tag may be left out) as this trigger's
    /// message, by that message's own contract rules, and reads the saga's key from it: what
    /// `POST /definitions/{saga_type}/sagas` and `sagactl start` publish.
    ///
    /// # Errors
    /// [`TriggerRefused`]: another message's tag, a message its rules refuse, no key.
    pub fn accept(&self, mut message: Value) -> Result<AcceptedTrigger, TriggerRefused> {
        let name = self.message.as_str();
        let known =
            trigger_message(name).ok_or_else(|| TriggerRefused::UnknownMessage(name.to_owned()))?;
        let fields = message
            .as_object_mut()
            .ok_or_else(|| TriggerRefused::NotAnObject {
                message: name.to_owned(),
            })?;
        // The tag may be left out; another message's is refused rather than published.
        match fields.get("type") {
            None => {
                fields.insert("type".into(), name.into());
            }
            Some(tag) if tag == name => {}
            Some(other) => {
                return Err(TriggerRefused::OtherType {
                    expected: name.to_owned(),
                    found: other.clone(),
                })
            }
        }
        let bytes = serde_json::to_vec(&message).map_err(TriggerRefused::Encode)?;
        let checked = (known.decode)(&bytes).map_err(TriggerRefused::Contract)?;
        let key = self.key_of(&checked).map_err(TriggerRefused::Key)?;
        Ok(AcceptedTrigger {
            message: checked,
            key,
        })
    }
}
