//! What the operations make, derived from the saga definitions in `sagas/` alone: trigger
//! messages from each definition's trigger message's sample (what the engine knows of it,
//! `definitions::TRIGGER_MESSAGES`), replies from the names each definition gives its steps'
//! outcomes. A new saga type in `sagas/` is fuzzed as it is, without a change here.

use std::path::Path;
use std::sync::LazyLock;

use events::Action;
use saga_core::definitions::{self, trigger_message};
use saga_core::SagaDefinition;
use serde_json::Value;
use uuid::Uuid;

use super::input::{Edit, ReplyChoice};

/// Every saga definition in `sagas/`, loaded once as the orchestrator loads them at start-up:
/// every input starts from clones of them.
pub static DEFINITIONS: LazyLock<Vec<SagaDefinition>> = LazyLock::new(|| {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../sagas"));
    let loaded = definitions::load_dir(dir).expect("the saga definitions load");
    assert!(
        !loaded.is_empty(),
        "no saga definitions in {}",
        dir.display()
    );
    loaded
});

/// Ids of subjects (the key of a saga, and any other id a trigger message names): a small set,
/// so that one id keys sagas of several types, and trigger messages repeat.
pub fn subject_uuid(n: u8) -> Uuid {
    Uuid::from_u128(0x0bde_0000 + u128::from(n))
}

/// A trigger message made for a definition, with the key it gives its saga.
pub struct Made {
    pub message: Value,
    pub key: String,
}

/// The JSON pointer of a definition's `trigger.key`.
fn key_pointer(definition: &SagaDefinition) -> String {
    definition
        .trigger
        .key
        .segments()
        .map(|segment| format!("/{segment}"))
        .collect()
}

/// The key a saga of `definition` gets from `message`: its value at `trigger.key`, text as it
/// is, a number in decimal.
pub fn key_of(definition: &SagaDefinition, message: &Value) -> Option<String> {
    match message.pointer(&key_pointer(definition))? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// A well-formed trigger message of `definition`: the sample of its trigger message, its key
/// made of `key` (a UUID when the sample's key is one, else the sample's key with `key` after
/// it, or a number), every other UUID in it taken in turn from `ids`. Its contract accepts it
/// (the caller checks): nothing but ids changed.
pub fn well_formed(definition: &SagaDefinition, key: u8, ids: &[u8]) -> Made {
    let known = trigger_message(&definition.trigger.message)
        .expect("a loaded definition's trigger message is known");
    let mut message = known
        .sample()
        .expect("a loaded definition's trigger message has a sample");
    let mut ids = ids.iter().copied().cycle().chain(std::iter::repeat(0));
    for pointer in leaves(&message) {
        if let Some(value @ Value::String(_)) = message.pointer_mut(&pointer) {
            if value
                .as_str()
                .is_some_and(|text| Uuid::parse_str(text).is_ok())
            {
                *value = Value::String(subject_uuid(ids.next().unwrap_or(0)).to_string());
            }
        }
    }
    let pointer = key_pointer(definition);
    let Some(value) = message.pointer_mut(&pointer) else {
        panic!(
            "the sample {} of {} has no key at {}",
            message, known.name, definition.trigger.key
        );
    };
    let (new, key) = match value {
        Value::String(text) if Uuid::parse_str(text).is_ok() => {
            let id = subject_uuid(key).to_string();
            (Value::String(id.clone()), id)
        }
        Value::String(text) => {
            let keyed = format!("{text}-{key}");
            (Value::String(keyed.clone()), keyed)
        }
        Value::Number(_) => (
            Value::from(1 + u64::from(key)),
            (1 + u64::from(key)).to_string(),
        ),
        other => panic!("the key of {}'s sample is {other}", known.name),
    };
    *value = new;
    Made { message, key }
}

/// The most scalars an edited message holds through repeated lists: room for the contract's
/// longest lists (100 items of a few fields each) to pass their bound, and few enough to walk
/// for every edit.
const MAX_LEAVES: usize = 1024;

/// A well-formed trigger message with `edits` applied, in order, which its contract may
/// refuse. The key is the one it was made with (an edit may change or remove it).
pub fn edited(definition: &SagaDefinition, key: u8, ids: &[u8], edits: &[Edit]) -> Made {
    let mut made = well_formed(definition, key, ids);
    let message = &mut made.message;
    for edit in edits {
        let (field, new) = match edit {
            Edit::Text { field, text } => (field, Some(Value::String(text.clone()))),
            Edit::Integer { field, value } => (field, Some(Value::from(*value))),
            Edit::Remove { field } => (field, None),
            Edit::Repeat { list, times } => {
                // Repeating a list whose first element holds a list, again and again, grows
                // the message geometrically: an input did so until walking it for each later
                // edit took longer than libFuzzer's timeout. Copies stop at MAX_LEAVES.
                let room = MAX_LEAVES.saturating_sub(leaves(message).len());
                let lists = lists(message);
                if let Some(Value::Array(items)) = pick(&lists, *list)
                    .cloned()
                    .and_then(|p| message.pointer_mut(&p))
                {
                    if let Some(first) = items.first().cloned() {
                        let copies = usize::from(*times).min(room / leaves(&first).len().max(1));
                        items.extend(std::iter::repeat_n(first, copies));
                    }
                }
                continue;
            }
        };
        let leaves = leaves(message);
        let Some(pointer) = pick(&leaves, *field) else {
            continue;
        };
        match new {
            Some(new) => {
                if let Some(value) = message.pointer_mut(pointer) {
                    *value = new;
                }
            }
            None => remove(message, pointer),
        }
    }
    made
}

fn pick<T>(items: &[T], index: u8) -> Option<&T> {
    (!items.is_empty()).then(|| &items[usize::from(index) % items.len()])
}

/// The JSON pointers of every scalar in `value` (list elements included), in order.
pub fn leaves(value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    walk(value, String::new(), &mut |pointer, value| {
        if !value.is_object() && !value.is_array() {
            found.push(pointer.to_owned());
        }
    });
    found
}

/// The JSON pointers of every list in `value`, in order.
fn lists(value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    walk(value, String::new(), &mut |pointer, value| {
        if value.is_array() {
            found.push(pointer.to_owned());
        }
    });
    found
}

fn walk(value: &Value, pointer: String, visit: &mut dyn FnMut(&str, &Value)) {
    visit(&pointer, value);
    match value {
        Value::Object(fields) => {
            for (name, field) in fields {
                walk(field, format!("{pointer}/{name}"), visit);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{pointer}/{i}"), visit);
            }
        }
        _ => {}
    }
}

/// Removes the value at `pointer` from its object or list.
fn remove(message: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    match message.pointer_mut(parent) {
        Some(Value::Object(fields)) => {
            fields.remove(last);
        }
        Some(Value::Array(items)) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < items.len() {
                    items.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// A reply a definition's participants may send: its step, direction, name and whether it
/// says the action was done.
pub struct Named {
    pub step: String,
    pub action: Action,
    pub name: String,
    pub succeeded: bool,
}

/// Every reply `definition` names, step by step: forward success and failure, then
/// compensation success and failure (the replies a definition does not name are left out).
pub fn named_replies(definition: &SagaDefinition) -> Vec<Named> {
    let mut named = Vec::new();
    for step in &definition.steps {
        let actions = [
            (Action::Forward, Some(&step.forward)),
            (Action::Compensate, step.compensation.as_ref()),
        ];
        for (action, defined) in actions {
            let Some(defined) = defined else { continue };
            let names = [(&defined.success, true)]
                .into_iter()
                .chain(defined.failure.as_ref().map(|f| (f, false)));
            for (name, succeeded) in names {
                named.push(Named {
                    step: step.name.clone(),
                    action,
                    name: name.clone(),
                    succeeded,
                });
            }
        }
    }
    named
}

/// The reply a forged one is named as, among `named` (of `definition`), and the outcome it
/// says; `waits_on` is the step and direction the saga waits on, if any.
pub fn forged_reply<'a>(
    definition: &SagaDefinition,
    named: &'a [Named],
    choice: ReplyChoice,
    waits_on: Option<(usize, Action)>,
) -> (&'a Named, bool) {
    match choice {
        ReplyChoice::Current {
            succeeded,
            mislabelled,
        } => {
            let (i, action) = waits_on.unwrap_or((0, Action::Forward));
            let step = &definition.steps[i % definition.steps.len()].name;
            // The step's replies in that direction; for a direction it has none in (the
            // compensation of a step that cannot be undone), its forward ones.
            let of_step: Vec<&Named> = named.iter().filter(|n| n.step == *step).collect();
            let candidates: Vec<&Named> = of_step
                .iter()
                .copied()
                .filter(|n| n.action == action)
                .collect();
            let candidates = if candidates.is_empty() {
                of_step
            } else {
                candidates
            };
            let labelled = succeeded != mislabelled;
            let chosen = candidates
                .iter()
                .find(|n| n.succeeded == labelled)
                .unwrap_or(&candidates[0]);
            (*chosen, succeeded)
        }
        ReplyChoice::Named(kind) => {
            // One more than the definition names: a reply named for one outcome that says
            // the other (a success's name saying it failed, a failure's saying it succeeded).
            let index = usize::from(kind) % (named.len() + 1);
            match named.get(index) {
                Some(chosen) => (chosen, chosen.succeeded),
                None => {
                    let chosen = &named[usize::from(kind) % named.len()];
                    (chosen, !chosen.succeeded)
                }
            }
        }
    }
}
