//! `sagactl generate`: writes the parts of the repository's files that follow from the saga
//! definitions (the AsyncAPI document's channels and operations, each participant's compose
//! service; `saga_core::generated` renders them), so that a new step or saga type is its
//! definition, its participant's code and its migration, with nothing derived edited by hand.
//! `--check` writes nothing and fails naming every file that differs.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use saga_core::definitions::load_dir;
use saga_core::generated::GENERATED_FILES;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The repository's root: the definitions are its `sagas/` and the files are below it.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Write nothing; fail naming each file that differs from what would be written.
    #[arg(long)]
    check: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sagas = args.root.join("sagas");
    let definitions = load_dir(&sagas)
        .with_context(|| format!("reading the saga definitions in {}", sagas.display()))?;
    let mut differ = Vec::new();
    // Every file that renders is written (or checked) even when another one cannot be.
    let mut refused = Vec::new();
    for file in GENERATED_FILES {
        let path = args.root.join(file.path);
        let current = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let rendered = match file.render(&definitions, &current) {
            Ok(rendered) => rendered,
            Err(e) => {
                refused.push(format!("{:#}", anyhow::Error::new(e)));
                continue;
            }
        };
        if rendered == current {
            continue;
        }
        if args.check {
            differ.push(file.path);
        } else {
            std::fs::write(&path, rendered)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", file.path);
        }
    }
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    if !differ.is_empty() {
        bail!(
            "{} differ from what the saga definitions give: run `sagactl generate` (from the \
             repository's root) and commit the result",
            differ.join(", ")
        );
    }
    Ok(())
}
