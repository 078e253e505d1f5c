//! What the repository's files say that follows from the saga definitions, rendered from them
//! (`sagactl generate` writes it, and a test checks that the committed files are what it would
//! write): the AsyncAPI document's channels and operations of every topic the definitions use,
//! with their message references (`asyncapi`); each participant's service in both compose
//! files (`compose`); and the contract of every command and reply that has no hand-written
//! schema: its JSON Schema, its golden example and its entry in the AsyncAPI document
//! (`contract`). What the definitions do not say stays hand-written: the trigger messages and
//! the engine's own messages, any command or reply whose schema a person wrote (the generator
//! tells its own schemas by their `$comment`), the descriptions of the channels and operations
//! there already are, and the compose files' broker, PostgreSQL, orchestrator and provisioning
//! services.
//!
//! Pure but for [`Files::read`]: [`generate`] takes the definitions and the files' current
//! text and returns the changes, the same for the same input; writing them is `sagactl`'s.

mod asyncapi;
mod compose;
mod contract;
mod json;

use std::collections::BTreeMap;
use std::path::Path;

use crate::definitions::SagaDefinition;

/// The folder of the contract's JSON Schemas, from the repository's root.
pub const SCHEMAS_DIR: &str = "events/contract/schemas";
/// The folder of the golden examples, one per message.
pub const GOLDEN_DIR: &str = "events/golden";

/// A file of the repository with parts generated from the definitions.
#[derive(Debug, Clone, Copy)]
struct GeneratedFile {
    /// Its path from the repository's root.
    path: &'static str,
    render: fn(&Wire, &contract::Plan, &str) -> Result<String, GenerateError>,
}

/// Every file with generated parts: each gets its text from the definitions and its own.
const GENERATED_FILES: [GeneratedFile; 3] = [
    GeneratedFile {
        path: asyncapi::PATH,
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

/// The repository's files the generator reads, by path from its root (`/` between folders):
/// the files with generated parts and every `.json` file of [`SCHEMAS_DIR`] and [`GOLDEN_DIR`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files(BTreeMap<String, String>);

impl Files {
    /// Reads them below `root`.
    ///
    /// # Errors
    /// [`GenerateError::Read`] naming the first file or folder that cannot be read.
    pub fn read(root: &Path) -> Result<Self, GenerateError> {
        let read = |path: &str| {
            std::fs::read_to_string(root.join(path)).map_err(|error| GenerateError::Read {
                path: path.to_owned(),
                error,
            })
        };
        let mut files = Self::default();
        for file in GENERATED_FILES {
            files.set(file.path, read(file.path)?);
        }
        for dir in [SCHEMAS_DIR, GOLDEN_DIR] {
            let unreadable = |error| GenerateError::Read {
                path: dir.to_owned(),
                error,
            };
            for entry in std::fs::read_dir(root.join(dir)).map_err(unreadable)? {
                let name = entry.map_err(unreadable)?.file_name();
                if let Some(name) = name.to_str().filter(|n| n.ends_with(".json")) {
                    let path = format!("{dir}/{name}");
                    files.set(&path, read(&path)?);
                }
            }
        }
        Ok(files)
    }

    /// The text of the file at `path`, when there is one.
    pub fn get(&self, path: &str) -> Option<&str> {
        self.0.get(path).map(String::as_str)
    }

    /// Puts `text` at `path`, in place of what was there.
    pub fn set(&mut self, path: &str, text: String) {
        self.0.insert(path.to_owned(), text);
    }

    /// The files as `change` leaves them.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Write { path, text } => self.set(path, text.clone()),
            Change::Remove { path } => {
                self.0.remove(path);
            }
        }
    }

    /// Every file (path and text), by path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(p, t)| (p.as_str(), t.as_str()))
    }

    /// The files directly in `dir`, by path.
    fn in_dir<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.iter().filter(move |(path, _)| {
            path.strip_prefix(dir)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|name| !name.contains('/'))
        })
    }
}

/// What the generator does to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Writes the file (a new one, or new text in place of the old).
    Write { path: String, text: String },
    /// Removes a file it wrote once that the definitions no longer give.
    Remove { path: String },
}

impl Change {
    /// The file's path from the repository's root.
    pub fn path(&self) -> &str {
        match self {
            Self::Write { path, .. } | Self::Remove { path } => path,
        }
    }
}

/// What [`generate`] found.
#[derive(Debug, Default)]
pub struct Generated {
    /// Every file that differs from what the definitions give, in the order of
    /// `GENERATED_FILES`, then the contract's files by path.
    pub changes: Vec<Change>,
    /// Why some files could not be rendered (every other file is in `changes` anyway).
    pub refused: Vec<GenerateError>,
}

/// The changes that make `files` what `definitions` (every version of every saga type, as
/// `load_dir` returns them) give.
pub fn generate(definitions: &[SagaDefinition], files: &Files) -> Generated {
    let wire = Wire::of(definitions);
    let mut generated = Generated::default();
    let plan = match contract::plan(definitions, files) {
        Ok(plan) => Some(plan),
        Err(error) => {
            generated.refused.push(error);
            None
        }
    };
    let no_contract = contract::Plan::default();
    for file in GENERATED_FILES {
        // The AsyncAPI document names the contract's messages: without them it waits.
        let needs_contract = file.path == asyncapi::PATH;
        let plan = match &plan {
            Some(plan) => plan,
            None if needs_contract => continue,
            None => &no_contract,
        };
        let Some(current) = files.get(file.path) else {
            generated
                .refused
                .push(GenerateError::Missing { file: file.path });
            continue;
        };
        match (file.render)(&wire, plan, current) {
            Ok(text) if text == current => {}
            Ok(text) => generated.changes.push(Change::Write {
                path: file.path.to_owned(),
                text,
            }),
            Err(error) => generated.refused.push(GenerateError::In {
                file: file.path,
                error: Box::new(error),
            }),
        }
    }
    if let Some(plan) = plan {
        let mut owned = plan.files;
        owned.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, text) in owned {
            match (text, files.get(&path)) {
                (Some(text), current) if current != Some(text.as_str()) => {
                    generated.changes.push(Change::Write { path, text });
                }
                (None, Some(_)) => generated.changes.push(Change::Remove { path }),
                _ => {}
            }
        }
    }
    generated
}

/// Why a file could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{file}")]
    In {
        file: &'static str,
        #[source]
        error: Box<GenerateError>,
    },
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        error: std::io::Error,
    },
    #[error("no file {file}")]
    Missing { file: &'static str },
    #[error("not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("the document has no object at {0}")]
    NotAnObject(&'static str),
    #[error(
        "no {message} under components.messages, which {topic} carries: its schema in \
         events/contract/schemas/ is hand-written, so its entry is too (or remove the schema, \
         and the generator writes all three)"
    )]
    MissingMessage { message: String, topic: String },
    #[error("no line `{marker}`: the generated services stand between the two marker lines")]
    MissingMarker { marker: &'static str },
    #[error("the commands of the definitions")]
    Definition(#[source] Box<crate::definitions::DefinitionError>),
    #[error("the engine knows no trigger message {message}")]
    NoTriggerSchema { message: String },
    #[error("{message}'s schema describes no field at {path}")]
    NoSchemaAt { message: String, path: String },
    #[error("{message} is named as a failure reply of a command without one")]
    NoFailureReply { message: String },
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
