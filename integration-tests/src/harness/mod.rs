//! The whole suite as real processes, for end-to-end and chaos tests (issue 9).
//!
//! - [`process`]: one service binary as a child process — start, `kill -9`, restart, pause.
//! - [`stack`]: all eight services on fresh PostgreSQL databases and a fresh queue prefix,
//!   fault injectors in front of the domain services, a booking client; cleans up on drop.
//! - [`rabbit`]: stopping and starting the RabbitMQ node (`rabbitmqctl`, after `await_startup`).
//! - [`load`]: a steady booking load that records what the clients were told.
//! - [`invariants`]: the checker that proves nothing was lost, doubled or left half-done.
//! - [`chaos`]: the chaos cases (`make chaos`) and what they share with the short one.

pub mod chaos;
pub mod invariants;
pub mod load;
pub mod process;
pub mod rabbit;
pub mod stack;

pub use invariants::{check, Bookings, Report, Violations};
pub use load::{Load, LoadOptions, LoadOutcome};
pub use process::{binaries, binary, free_port, ServiceProcess};
pub use rabbit::RabbitNode;
pub use stack::{Answer, DownstreamFaults, Service, Stack, StackClient, StackOptions};
