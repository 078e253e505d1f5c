//! What the repository says of its saga types outside `sagas/` is generated from the
//! definitions (`crate::generated`): the published wire contract's channels and operations
//! (`events/contract/asyncapi.json`), each participant's service in the compose files, and the
//! schema, golden example and document entry of every command and reply without a
//! hand-written schema. The committed files must be what `sagactl generate` writes, so a saga type or a step added to
//! `sagas/` without running it fails here, naming the files and the command. (The scripts, the
//! Dockerfile and the ACL plan derive their lists of services and topics from the definitions
//! at run time, so they need no file of their own.)

use std::path::{Path, PathBuf};

use super::{load_dir, with_causes};
use crate::generated::{generate, Change, Files};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_committed_files_are_what_the_generator_writes_from_the_definitions() {
    let definitions = load_dir(&repository().join("sagas")).expect("sagas/ loads");
    let files = Files::read(&repository()).unwrap_or_else(|e| panic!("{}", with_causes(&e)));
    let generated = generate(&definitions, &files);
    let refused: Vec<String> = generated.refused.iter().map(|e| with_causes(e)).collect();
    assert!(refused.is_empty(), "{refused:?}");
    let differ: Vec<&str> = generated.changes.iter().map(Change::path).collect();
    assert!(
        differ.is_empty(),
        "{differ:?} differ from what the saga definitions give: run `cargo run -p sagactl -- \
         generate` and commit the result"
    );
}
