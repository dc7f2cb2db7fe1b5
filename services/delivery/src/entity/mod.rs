//! The service's tables: `deliveries` (what was ordered) and `tracking_events` (what happened to it,
//! append-only; a delivery's stage is the stage of its latest event).

pub mod delivery;
pub mod tracking_event;
