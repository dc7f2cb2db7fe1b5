//! The service's tables: `deliveries` (what was ordered) and `tracking_events` (what happened to it,
//! append-only; a delivery's stage is the stage of its latest event), and `tracking_outbox` (events
//! still to be published on `workflow-events`).

pub mod delivery;
pub mod tracking_event;
pub mod tracking_outbox;
