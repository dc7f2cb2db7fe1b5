//! What this replica keeps while it holds one partition's lease: the fence every write carries,
//! which sagas a task of this process is working on (at most one writer per saga: whoever holds
//! its entry), the signals waiting for them, sagas waiting for a slot, and the checkpoint tracker.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use saga::{Fence, Inbox, Lease, Signal, Started};
use tokio::sync::Notify;

use crate::tracker::Tracker;

/// A saga some task of this process is working on, and the signals that arrived for it meanwhile.
#[derive(Debug, Default)]
struct Slot {
    signals: Vec<Signal>,
}

/// Where a signal went.
pub enum Offered {
    /// To the task working on the saga; it records the signal at its next step boundary.
    ToHolder,
    /// Nobody was working on the saga: the caller now holds its entry and must record the signal.
    Claimed,
}

pub struct Owner {
    pub partition: u32,
    pub lease: Lease,
    active: Mutex<BTreeMap<String, Slot>>,
    tracker: Mutex<Tracker>,
    /// Sagas claimed and waiting for a slot (resumed after a takeover, or started while every
    /// slot was busy).
    queue: Mutex<VecDeque<(Started, bool)>>,
    /// Tasks dispatched from a due timer that are still running (their row may still look due).
    pub from_timer: AtomicUsize,
    lost: AtomicBool,
    /// Notified when a write was refused: the partition must be let go.
    pub lost_notify: Notify,
    /// Notified when a saga task ends: a slot is free.
    pub ended: Notify,
    /// Notified when this replica made a saga due now (a signal recorded, a retry).
    pub timers: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Owner {
    pub fn new(partition: u32, lease: Lease) -> Self {
        Self {
            partition,
            lease,
            active: Mutex::new(BTreeMap::new()),
            tracker: Mutex::new(Tracker::default()),
            queue: Mutex::new(VecDeque::new()),
            from_timer: AtomicUsize::new(0),
            lost: AtomicBool::new(false),
            lost_notify: Notify::new(),
            ended: Notify::new(),
            timers: Notify::new(),
        }
    }

    pub fn fence(&self) -> Fence {
        self.lease.fence()
    }

    /// Takes the saga's entry; false when a task holds it already.
    pub fn claim(&self, id: &str) -> bool {
        let mut active = lock(&self.active);
        if active.contains_key(id) {
            return false;
        }
        active.insert(id.to_owned(), Slot::default());
        true
    }

    /// Hands `signal` to the saga's holder, or claims the saga for the caller with the signal in
    /// its slot.
    pub fn offer(&self, id: &str, signal: Signal) -> Offered {
        let mut active = lock(&self.active);
        match active.get_mut(id) {
            Some(slot) => {
                slot.signals.push(signal);
                Offered::ToHolder
            }
            None => {
                active.insert(
                    id.to_owned(),
                    Slot {
                        signals: vec![signal],
                    },
                );
                Offered::Claimed
            }
        }
    }

    /// The holder is done: releases the entry unless signals arrived meanwhile, which it then
    /// takes (and must record) instead.
    pub fn finish(&self, id: &str) -> Option<Vec<Signal>> {
        let mut active = lock(&self.active);
        match active.get_mut(id) {
            Some(slot) if !slot.signals.is_empty() => Some(std::mem::take(&mut slot.signals)),
            _ => {
                active.remove(id);
                None
            }
        }
    }

    /// The holder is done: releases the entry and answers true, unless signals arrived meanwhile;
    /// then the entry and its signals stay, and the holder goes on with them.
    pub fn release_if_idle(&self, id: &str) -> bool {
        let mut active = lock(&self.active);
        if active.get(id).is_some_and(|s| !s.signals.is_empty()) {
            return false;
        }
        active.remove(id);
        true
    }

    /// Whether signals wait in the saga's slot.
    pub fn has_signals(&self, id: &str) -> bool {
        lock(&self.active)
            .get(id)
            .is_some_and(|s| !s.signals.is_empty())
    }

    /// `fresh`: just started, so its journal has no attempts to read when it runs.
    pub fn queue(&self, saga: impl Into<Started>, fresh: bool) {
        lock(&self.queue).push_back((saga.into(), fresh));
    }

    pub fn dequeue(&self) -> Option<(Started, bool)> {
        lock(&self.queue).pop_front()
    }

    pub fn queued(&self) -> usize {
        lock(&self.queue).len()
    }

    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        lock(&self.tracker)
    }

    /// A write was refused: stop working on the partition.
    pub fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.lost_notify.notify_one();
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Inbox for Owner {
    fn has(&self, id: &str) -> bool {
        self.has_signals(id)
    }

    fn take(&self, id: &str) -> Vec<Signal> {
        lock(&self.active)
            .get_mut(id)
            .map(|s| std::mem::take(&mut s.signals))
            .unwrap_or_default()
    }

    fn recorded(&self, signals: &[Signal]) {
        let mut t = self.tracker();
        for p in signals.iter().filter_map(|s| s.position) {
            t.end(p);
        }
    }
}
