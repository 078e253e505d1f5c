//! The fuzz target `orchestrator_records`: the orchestrator's consumer path, record →
//! decoder → state machine, against an in-memory store, for every saga type `sagas/` defines.
//!
//! The definitions are loaded as the orchestrator loads them (`definitions::load_dir`), given
//! the input's retry policies, and put in a [`Registry`](saga_core::Registry): a
//! record on a definition's trigger topic starts a saga of it, and each saga moves by its own
//! definition. Trigger messages, steps, topics and reply names all come from the definitions
//! ([`generate`]), so a new saga type is fuzzed without a change here.
//!
//! The input ([`input`]) is a sequence of operations: records on a trigger topic, the replies
//! topic or a topic the orchestrator does not read (raw bytes), well-formed trigger messages of
//! each definition and edited ones (now and then on another saga's trigger topic, which
//! refuses them), answers to commands a saga really sent, forged replies (any reply a
//! definition names, or one mislabelled, for any step, direction and attempt, naming the
//! saga's own type or another), redeliveries, deadline scans, operator actions and clock
//! advances. Each record goes through the handler's rules ([`world`]); every decision of the
//! machine is held against the reference oracle the property tests share
//! (`saga_core::oracle`: the next state, step statuses, attempts, command, event and
//! deadline it expects, and the invariants of sagas, starts and transitions). At the end every
//! saga, of every type, is driven to its end, once by answering every command and once by
//! deadlines alone ([`drive`]): nothing may wedge it.

mod drive;
pub mod generate;
pub mod input;
mod world;

pub use input::Input;

use world::World;

/// One input, from its first operation to the end of every saga it started.
pub fn run(input: &Input) {
    let mut world = World::new(&input.policies);
    for op in &input.ops {
        world.step(op);
    }
    for id in world.order_of_creation.clone() {
        world.check_row(id);
        world.drive_by_answers(id);
        world.drive_by_deadlines(id);
    }
}
