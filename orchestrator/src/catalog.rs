//! The saga definitions this orchestrator runs: read from the definition files at start-up,
//! stored in PostgreSQL the first time each version is seen, and read back from there for a
//! saga whose version no file holds any more (it started before an upgrade, or on another
//! orchestrator of a rolling upgrade).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::config::RetryConfig;
use crate::saga::definitions::{self, SagaDefinition};
use crate::saga::Registry;
use crate::{store, Error, Result};

/// The definitions, shared by the consumer, the deadline scanner and the API.
#[derive(Debug)]
pub struct Catalog {
    registry: RwLock<Registry>,
    first_seen: RwLock<HashMap<(String, i32), DateTime<Utc>>>,
    retries: RetryConfig,
}

impl Catalog {
    /// Loads every definition in `dir`, applies the deployment's retry settings, checks each
    /// against the wire contract, stores the versions not stored yet and loads the stored
    /// ones. A file that changes a stored version without raising it stops the start.
    ///
    /// # Errors
    /// [`Error::Definition`] naming the file and field, [`Error::DefinitionChanged`], database
    /// errors.
    pub async fn load(pool: &PgPool, dir: &Path, retries: RetryConfig) -> Result<Self> {
        let mut files = definitions::load_dir(dir)?;
        for definition in &mut files {
            retries.apply(definition)?;
        }
        retries.check_overrides(&files)?;
        for definition in &files {
            let stored = store::register_definition(pool, definition).await?;
            if stored != definition.digest() {
                return Err(Error::DefinitionChanged {
                    file: definition.file.clone(),
                    name: definition.name.clone(),
                    version: definition.version,
                });
            }
        }
        let catalog = Self {
            registry: RwLock::new(Registry::new(files)?),
            first_seen: RwLock::default(),
            retries,
        };
        for stored in store::stored_definitions(pool, None).await? {
            catalog.add_stored(stored)?;
        }
        Ok(catalog)
    }

    fn add_stored(&self, stored: store::StoredDefinition) -> Result<Arc<SagaDefinition>> {
        let label = format!("stored {} v{}", stored.name, stored.version);
        let mut definition = definitions::parse_stored(&label, &stored.canonical)?;
        self.retries.apply(&mut definition)?;
        write(&self.first_seen).insert((stored.name, stored.version), stored.first_seen_at);
        Ok(write(&self.registry).add(definition)?)
    }

    /// The definition `name` at `version`, read from the database when this orchestrator has
    /// not seen it yet.
    ///
    /// # Errors
    /// [`Error::UnknownDefinition`] when no orchestrator stored it; database errors.
    pub async fn get(
        &self,
        executor: impl PgExecutor<'_>,
        name: &str,
        version: i32,
    ) -> Result<Arc<SagaDefinition>> {
        if let Some(known) = read(&self.registry).get(name, version) {
            return Ok(Arc::clone(known));
        }
        let stored = store::stored_definitions(executor, Some((name, version)))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::UnknownDefinition {
                name: name.to_owned(),
                version,
            })?;
        self.add_stored(stored)
    }

    /// The definition new sagas for a `message` on `topic` (without the prefix) start on.
    pub fn for_trigger(&self, topic: &str, message: &str) -> Option<Arc<SagaDefinition>> {
        read(&self.registry).for_trigger(topic, message).cloned()
    }

    /// The definition new sagas for a record on `topic` (without the prefix) start on: the
    /// one whose trigger arrives there (loading allows one trigger message per topic).
    pub fn for_topic(&self, topic: &str) -> Option<Arc<SagaDefinition>> {
        read(&self.registry).for_topic(topic).cloned()
    }

    /// The definition new sagas of the type `name` start on, if the type is known.
    pub fn newest(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        read(&self.registry).newest(name).cloned()
    }

    /// Every known version, with whether new sagas start on it and when it was first stored.
    pub fn list(&self) -> Vec<(Arc<SagaDefinition>, bool, Option<DateTime<Utc>>)> {
        let registry = read(&self.registry);
        let first_seen = read(&self.first_seen);
        registry
            .all()
            .map(|d| {
                let newest = registry.newest(&d.name).is_some_and(|n| Arc::ptr_eq(n, d));
                let seen = first_seen.get(&(d.name.clone(), d.version)).copied();
                (Arc::clone(d), newest, seen)
            })
            .collect()
    }

    /// Every step name of every known definition, sorted.
    pub fn step_names(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.registry)
            .all()
            .flat_map(|d| d.steps.iter().map(|s| s.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The name of every known saga type, sorted.
    pub fn saga_types(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.registry).all().map(|d| d.name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The trigger and command topics of the known definitions ([`Registry::topics`]).
    pub fn topics(&self) -> (Vec<String>, Vec<String>) {
        read(&self.registry).topics()
    }
}

// A panic elsewhere cannot leave the maps half-changed (each change is one insert), so a
// poisoned lock is still sound to use.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
