//! Every participant of this repository, by the name the saga definitions give it, for what
//! starts them by those names (the end-to-end tests). Each binary (`participants/src/bin`)
//! builds its own participant from its command line instead; the participants library holds
//! only the services.

use participant_sdk::Participant;
use participants::shipping::ShippingConfig;
use participants::{inventory, payment, returns, shipping};

/// The settings of the participants that have some; the defaults are the binaries'.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub shipping: ShippingConfig,
}

/// Builds one participant.
type Build = fn(&Settings) -> Participant;

/// One entry per participant: its name is the one it gives itself.
const PARTICIPANTS: [Build; 4] = [
    |_| inventory::participant(),
    |_| payment::participant(),
    |_| returns::participant(),
    |settings| shipping::participant(&settings.shipping),
];

/// Every participant of the repository, built with `settings`.
pub fn all(settings: &Settings) -> Vec<Participant> {
    PARTICIPANTS.iter().map(|build| build(settings)).collect()
}

/// The participant called `name`, built with `settings`; `None` when the repository has none
/// of that name.
pub fn participant(name: &str, settings: &Settings) -> Option<Participant> {
    all(settings).into_iter().find(|p| p.name() == name)
}

/// The repository's participant called `name`, as the tests run it (the binaries' default
/// settings: shipping denies AQ and BV).
///
/// # Panics
/// When the repository has none of that name.
pub fn named(name: &str) -> Participant {
    participant(name, &Settings::default()).unwrap_or_else(|| {
        panic!("no participant {name} in the test kit's registry (testkit/src/participants.rs)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_participant_is_found_by_its_own_name_and_can_be_run() {
        let settings = Settings::default();
        let names: Vec<&str> = all(&settings).iter().map(Participant::name).collect();
        assert_eq!(names, ["inventory", "payment", "returns", "shipping"]);
        for name in names {
            let found = participant(name, &settings).unwrap_or_else(|| panic!("{name} found"));
            assert_eq!(found.name(), name);
            assert!(found.check().is_ok(), "{name} can be run");
        }
        assert!(participant("loyalty", &settings).is_none());
    }

    #[test]
    fn shipping_denies_aq_and_bv_by_default() {
        assert_eq!(Settings::default().shipping.denied_countries, ["AQ", "BV"]);
    }
}
