//! One spawn function per service: fresh database, migrations run at start, port 0.

mod account;
mod delivery;
mod drone;
mod ingestion;
mod package;
mod suite;
mod supervisor;

pub use account::spawn_account;
pub use delivery::spawn_delivery;
pub use drone::{spawn_drone, spawn_drone_with};
pub use ingestion::{spawn_ingestion, IngestionApp};
pub use package::spawn_package;
pub use suite::{spawn_suite, Suite, SuiteFaults};
pub use supervisor::{spawn_supervisor, SupervisorApp, OPERATOR, VIEWER};

use service_kit::{AuthSettings, HttpSettings};

use crate::{JWT_SECRET, SERVICE_TOKEN};

/// HTTP settings for tests: localhost, a free port, two workers.
pub fn test_http() -> HttpSettings {
    HttpSettings {
        host: "127.0.0.1".into(),
        port: 0,
        workers: 2,
        ..HttpSettings::default()
    }
}

pub fn test_auth() -> AuthSettings {
    AuthSettings::new(SERVICE_TOKEN, JWT_SECRET)
}
