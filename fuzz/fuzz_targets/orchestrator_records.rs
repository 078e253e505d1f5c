//! The orchestrator's consumer path, record → decoder → state machine, for every saga type
//! `sagas/` defines: `saga_fuzz::records` (the operations, the in-memory store and the drivers)
//! and the reference oracle of the machine's rules, `saga_core::oracle`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saga_fuzz::records::{run, Input};

fuzz_target!(|input: Input| run(&input));
