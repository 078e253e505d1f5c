//! The parts of the repository's files that follow from the saga definitions, rendered from
//! them (`sagactl generate` writes them, and a test checks that the committed files are what
//! it would write): the AsyncAPI document's channels and operations of every topic the
//! definitions use, with their message references (`asyncapi`), and each participant's
//! service in both compose files (`compose`). What the definitions do not say stays
//! hand-written: the message schemas (the contract), the engine's own channels, the
//! descriptions of the channels and operations there already are, and the compose files'
//! broker, PostgreSQL, orchestrator and provisioning services.
//!
//! Pure: each renderer takes the definitions and the file's current text and returns the new
//! text, the same bytes for the same input; reading and writing the files is `sagactl`'s.

mod asyncapi;
mod compose;
mod json;

use crate::definitions::SagaDefinition;

/// A file of the repository with parts generated from the definitions.
#[derive(Debug, Clone, Copy)]
pub struct GeneratedFile {
    /// Its path from the repository's root.
    pub path: &'static str,
    render: fn(&Wire, &str) -> Result<String, GenerateError>,
}

impl GeneratedFile {
    /// The file's text with its generated parts rendered from `definitions` (every version of
    /// every saga type, as `load_dir` returns them), the rest as in `current`.
    ///
    /// # Errors
    /// When `current` is not a file the generator can fill in (see [`GenerateError`]).
    pub fn render(
        &self,
        definitions: &[SagaDefinition],
        current: &str,
    ) -> Result<String, GenerateError> {
        (self.render)(&Wire::of(definitions), current).map_err(|error| match error {
            GenerateError::In { .. } => error,
            other => GenerateError::In {
                file: self.path,
                error: Box::new(other),
            },
        })
    }
}

/// Every file with generated parts.
pub const GENERATED_FILES: [GeneratedFile; 3] = [
    GeneratedFile {
        path: "events/contract/asyncapi.json",
        render: asyncapi::render,
    },
    GeneratedFile {
        path: "docker-compose.yml",
        render: compose::render_plain,
    },
    GeneratedFile {
        path: "docker-compose.secured.yml",
        render: compose::render_secured,
    },
];

/// Why a file could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{file}")]
    In {
        file: &'static str,
        #[source]
        error: Box<GenerateError>,
    },
    #[error("not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("the document has no object at {0}")]
    NotAnObject(&'static str),
    #[error(
        "no {message} under components.messages, which {topic} carries: write its entry (and \
         its schema in events/contract/schemas/)"
    )]
    MissingMessage { message: String, topic: String },
    #[error("no line `{marker}`: the generated services stand between the two marker lines")]
    MissingMarker { marker: &'static str },
}

/// What the definitions put on the wire and run, each in the order the definitions first name
/// it (the definitions sorted by name and version, their steps in order, forward before
/// compensation, success before failure).
#[derive(Debug, Default)]
struct Wire {
    /// Every trigger topic: the saga type it starts and its messages.
    triggers: Vec<Topic>,
    /// Every command topic: its participant and its commands.
    commands: Vec<Topic>,
    /// Every reply the participants may send.
    replies: Vec<String>,
}

/// A topic a definition names, without the prefix.
#[derive(Debug)]
struct Topic {
    topic: String,
    /// The saga type it triggers, or the participant it carries commands to.
    owner: String,
    messages: Vec<String>,
}

impl Wire {
    fn of(definitions: &[SagaDefinition]) -> Self {
        let mut wire = Self::default();
        for definition in definitions {
            let trigger = &definition.trigger;
            add(
                &mut wire.triggers,
                &trigger.topic,
                &definition.name,
                &trigger.message,
            );
            for step in &definition.steps {
                for action in std::iter::once(&step.forward).chain(&step.compensation) {
                    add(
                        &mut wire.commands,
                        &step.topic,
                        &step.participant,
                        &action.name,
                    );
                    for reply in std::iter::once(&action.success).chain(&action.failure) {
                        push_new(&mut wire.replies, reply);
                    }
                }
            }
        }
        wire
    }

    /// The participants, in the order their command topics first appear.
    fn participants(&self) -> impl Iterator<Item = &str> {
        self.commands.iter().map(|t| t.owner.as_str())
    }
}

fn add(topics: &mut Vec<Topic>, topic: &str, owner: &str, message: &str) {
    let index = match topics.iter().position(|t| t.topic == topic) {
        Some(index) => index,
        None => {
            topics.push(Topic {
                topic: topic.to_owned(),
                owner: owner.to_owned(),
                messages: Vec::new(),
            });
            topics.len() - 1
        }
    };
    push_new(&mut topics[index].messages, message);
}

fn push_new(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|i| i == item) {
        list.push(item.to_owned());
    }
}

#[cfg(test)]
mod tests;
