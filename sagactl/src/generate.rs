//! `sagactl generate`: writes what the repository's files say that follows from the saga
//! definitions (the AsyncAPI document's channels and operations, each participant's compose
//! service, and the schema, golden example and document entry of every command and reply
//! without a hand-written schema; `saga_core::generated` renders them), so that a new step or
//! saga type is its definition, its participant's code and its migration, with nothing derived
//! edited by hand. It removes the files it wrote of messages no definition names any more.
//! `--check` writes nothing and fails naming every file that differs, is missing or is left
//! over.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use saga_core::definitions::load_dir;
use saga_core::generated::{generate, Change, Files};

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The repository's root: the definitions are its `sagas/` and the files are below it.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Write nothing; fail naming each file that differs from what would be written (or is
    /// missing, or would be removed).
    #[arg(long)]
    check: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sagas = args.root.join("sagas");
    let definitions = load_dir(&sagas)
        .with_context(|| format!("reading the saga definitions in {}", sagas.display()))?;
    let files = Files::read(&args.root)
        .with_context(|| format!("reading the repository at {}", args.root.display()))?;
    // Every file that renders is written (or checked) even when another one cannot be.
    let generated = generate(&definitions, &files);
    if args.check {
        if !generated.changes.is_empty() {
            let differ: Vec<String> = generated
                .changes
                .iter()
                .map(|change| {
                    let state = match change {
                        Change::Write { path, .. } if files.get(path).is_none() => "missing",
                        Change::Write { .. } => "stale",
                        Change::Remove { .. } => "left over",
                    };
                    format!("{} ({state})", change.path())
                })
                .collect();
            eprintln!(
                "{} differ from what the saga definitions give: run `sagactl generate` (from \
                 the repository's root) and commit the result",
                differ.join(", ")
            );
        }
    } else {
        for change in &generated.changes {
            let path = args.root.join(change.path());
            match change {
                Change::Write { text, .. } => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", change.path());
                }
                Change::Remove { .. } => {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                    eprintln!("removed {}", change.path());
                }
            }
        }
    }
    if !generated.refused.is_empty() {
        let refused: Vec<String> = generated
            .refused
            .into_iter()
            .map(|e| format!("{:#}", anyhow::Error::new(e)))
            .collect();
        bail!("{}", refused.join("; "));
    }
    if args.check && !generated.changes.is_empty() {
        bail!("the generated files are not what the saga definitions give");
    }
    Ok(())
}
