//! Loading definitions: every file of a folder, one file, or one stored canonical form; and
//! the checks across files.

use std::collections::HashMap;
use std::path::Path;

use super::{raw, Checker, DefinitionError, Problem, SagaDefinition};

/// Reads every `*.toml` file of `dir` (not its subfolders; other files, like a README, are
/// skipped), validates each, and checks them against each other: one definition per saga name
/// and version, one saga type per trigger, one command topic per participant. Sorted by name,
/// then version.
///
/// # Errors
/// The first problem found, naming the file and field.
pub fn load_dir(dir: &Path) -> Result<Vec<SagaDefinition>, DefinitionError> {
    let read_dir = |error| DefinitionError::ReadDir {
        dir: dir.to_owned(),
        error,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(DefinitionError::NoDefinitions {
            dir: dir.to_owned(),
        });
    }
    files.sort();
    let mut definitions = Vec::with_capacity(files.len());
    for path in files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|error| DefinitionError::ReadFile {
            file: file.clone(),
            error,
        })?;
        definitions.push(parse(&file, &text)?);
    }
    check_together(&definitions)?;
    definitions.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    Ok(definitions)
}

/// The checks across files, in file order: each definition against the ones before it.
fn check_together(definitions: &[SagaDefinition]) -> Result<(), DefinitionError> {
    let mut routes = Routes::default();
    for (i, definition) in definitions.iter().enumerate() {
        let invalid = |field: &str, problem| DefinitionError::Invalid {
            file: definition.file.clone(),
            field: field.to_owned(),
            problem: Box::new(problem),
        };
        for earlier in &definitions[..i] {
            if earlier.name == definition.name && earlier.version == definition.version {
                return Err(invalid(
                    "version",
                    Problem::DuplicateVersion {
                        name: definition.name.clone(),
                        version: definition.version,
                        other_file: earlier.file.clone(),
                    },
                ));
            }
            // One saga type per trigger topic (whatever the message): a record on it starts
            // that type's saga or is dead-lettered, never a guess between two.
            if earlier.name != definition.name && earlier.trigger.topic == definition.trigger.topic
            {
                return Err(invalid(
                    "trigger",
                    Problem::SharedTrigger {
                        topic: definition.trigger.topic.clone(),
                        message: definition.trigger.message.clone(),
                        other_saga: earlier.name.clone(),
                        other_file: earlier.file.clone(),
                    },
                ));
            }
        }
        for (j, step) in definition.steps.iter().enumerate() {
            let place = format!("{} steps[{j}].topic", definition.file);
            routes
                .add(&step.participant, &step.topic, place)
                .map_err(|problem| invalid(&format!("steps[{j}].topic"), problem))?;
        }
        for (j, step) in definition.steps.iter().enumerate() {
            // A participant routes a command by its step name alone, and its step ledger is
            // keyed by (saga key, step): a step name shared by two saga types would let one
            // type's saga be answered from the other's ledger row when their keys meet.
            let other = definitions[..i].iter().find(|earlier| {
                earlier.name != definition.name && earlier.step(&step.name).is_some()
            });
            if let Some(earlier) = other {
                return Err(invalid(
                    &format!("steps[{j}].name"),
                    Problem::StepOfAnotherSaga {
                        step: step.name.clone(),
                        other_saga: earlier.name.clone(),
                        other_file: earlier.file.clone(),
                    },
                ));
            }
        }
    }
    Ok(())
}

/// Which participant receives commands on which topic, and where that was said first.
#[derive(Default)]
pub(super) struct Routes {
    topic_of: HashMap<String, (String, String)>,
    participant_of: HashMap<String, (String, String)>,
}

impl Routes {
    pub(super) fn add(
        &mut self,
        participant: &str,
        topic: &str,
        place: String,
    ) -> Result<(), Problem> {
        if let Some((other_topic, other)) = self.topic_of.get(participant) {
            if other_topic != topic {
                return Err(Problem::ParticipantTopicConflict {
                    participant: participant.to_owned(),
                    other_topic: other_topic.clone(),
                    other: other.clone(),
                });
            }
        }
        if let Some((other_participant, other)) = self.participant_of.get(topic) {
            if other_participant != participant {
                return Err(Problem::TopicParticipantConflict {
                    topic: topic.to_owned(),
                    other_participant: other_participant.clone(),
                    other: other.clone(),
                });
            }
        }
        self.topic_of
            .entry(participant.to_owned())
            .or_insert_with(|| (topic.to_owned(), place.clone()));
        self.participant_of
            .entry(topic.to_owned())
            .or_insert_with(|| (participant.to_owned(), place));
        Ok(())
    }
}

/// Reads and validates one definition; `file` names it in errors.
///
/// # Errors
/// [`DefinitionError::Syntax`] when the text is not TOML of this format (toml's message names
/// the field and line), [`DefinitionError::Invalid`] naming the first field that breaks a rule.
pub fn parse(file: &str, text: &str) -> Result<SagaDefinition, DefinitionError> {
    let raw: raw::Saga = toml::from_str(text).map_err(|error| DefinitionError::Syntax {
        file: file.to_owned(),
        error: Box::new(error),
    })?;
    Checker::new(file).saga(raw)
}

/// Reads a definition back from its canonical form ([`SagaDefinition::canonical`]), as the
/// engine stored it; `label` names it in errors. Validated like a file.
///
/// # Errors
/// [`DefinitionError::Stored`] when `canonical` is not the format, otherwise as [`parse`].
pub fn parse_stored(label: &str, canonical: &str) -> Result<SagaDefinition, DefinitionError> {
    let raw: raw::Saga =
        serde_json::from_str(canonical).map_err(|error| DefinitionError::Stored {
            file: label.to_owned(),
            error,
        })?;
    Checker::new(label).saga(raw)
}
