//! A short-lived in-memory copy of recently read accounts, so the account check every saga makes
//! rarely reaches the database. A change shows after at most the time to live; a write through
//! this instance drops the entry, so it normally shows here at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::entity;

/// Entries kept at most; past that, expired ones are dropped (and all, if none has expired).
const MAX_ENTRIES: usize = 100_000;

pub(crate) struct AccountCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, entity::Model)>>,
}

impl AccountCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, entity::Model)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The account as read less than the time to live ago.
    pub(crate) fn get(&self, id: &str) -> Option<entity::Model> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.lock();
        let (at, model) = entries.get(id)?;
        (at.elapsed() < self.ttl).then(|| model.clone())
    }

    /// Remembers what the database just said.
    pub(crate) fn put(&self, model: &entity::Model) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(model.id.clone(), (Instant::now(), model.clone()));
    }

    /// Forgets an account (before it is written, so no reader caches the old row after the write).
    pub(crate) fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}
