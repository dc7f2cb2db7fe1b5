//! One client's Server-Sent Events stream of a booking's history: the entries after its cursor,
//! then each new one as the projection records it. Woken by the projection on this replica, and
//! re-reading the database every `poll_ms` anyway, for the changes another replica recorded first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use contracts::{HistorySource, TrackingEntry};
use futures::Stream;
use sea_orm::DatabaseConnection;
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};
use uuid::Uuid;

use super::store::{entries_after, Watch};

/// Entries read per query; a longer backlog is read in pages.
const PAGE: u64 = 200;

/// The stream's event of one entry: its id, `booking` or `tracking`, the entry as JSON.
pub(crate) fn frame(entry: &TrackingEntry) -> Bytes {
    let event = match entry.source {
        HistorySource::Booking => "booking",
        HistorySource::Delivery => "tracking",
    };
    // Compact JSON has no line breaks (those in strings are escaped): one `data` line.
    let data = serde_json::to_string(entry).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!(
        "id: {}\nevent: {event}\ndata: {data}\n\n",
        entry.id
    ))
}

/// A place among the streams a replica keeps open; given back when the stream ends.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place if fewer than `max` streams are open.
    pub(crate) fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a stream needs to follow one booking.
pub(crate) struct Follow {
    pub db: DatabaseConnection,
    pub id: Uuid,
    /// The last entry sent (the client's `Last-Event-ID`).
    pub cursor: i64,
    /// Sent first (the reconnection delay, the acceptance entry).
    pub first: Vec<Bytes>,
    pub watch: Watch,
    pub slot: Slot,
    pub poll: Duration,
    pub heartbeat: Duration,
}

struct Following {
    db: DatabaseConnection,
    id: Uuid,
    cursor: i64,
    queue: VecDeque<Bytes>,
    due: bool,
    watch: Watch,
    poll: Interval,
    heartbeat: Interval,
    /// The last read failed (logged once per outage, not once per poll of every stream).
    failing: bool,
    _slot: Slot,
}

/// The stream's bytes. It ends only when the client goes away (the server drops it then) or
/// the server stops.
pub(crate) fn stream(f: Follow) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    let every = |period: Duration| {
        let period = period.max(Duration::from_millis(10));
        let mut i = interval_at(Instant::now() + period, period);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    };
    let state = Following {
        db: f.db,
        id: f.id,
        cursor: f.cursor,
        queue: f.first.into(),
        due: true,
        watch: f.watch,
        poll: every(f.poll),
        heartbeat: every(f.heartbeat),
        failing: false,
        _slot: f.slot,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(bytes) = s.queue.pop_front() {
                return Some((Ok(bytes), s));
            }
            if s.due {
                s.due = false;
                match entries_after(&s.db, s.id, s.cursor, PAGE).await {
                    Ok(entries) => {
                        s.failing = false;
                        s.due = entries.len() as u64 == PAGE;
                        for e in &entries {
                            s.cursor = e.id;
                            s.queue.push_back(frame(e));
                        }
                    }
                    // The next poll tries again; the client keeps its place meanwhile.
                    Err(e) if !s.failing => {
                        s.failing = true;
                        tracing::warn!(delivery_id = %s.id, error = %e, "reading booking history failed");
                    }
                    Err(_) => {}
                }
                continue;
            }
            tokio::select! {
                () = s.watch.changed() => s.due = true,
                _ = s.poll.tick() => s.due = true,
                _ = s.heartbeat.tick() => s.queue.push_back(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    })
}
