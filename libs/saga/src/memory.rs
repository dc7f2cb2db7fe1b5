//! [`Store`] in process memory: the same rules as the SQL store, deterministic, for simulations.
//! It also keeps a history of every accepted write, so a simulation can check afterwards that no
//! stale owner's write landed and that versions only grew.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::store::{
    Attempt, Change, Fence, JournalError, Lease, LeaseRow, ListFilter, OutboxMessage, OutboxRow,
    Position, SagaRecord, Store, Write, Written,
};

/// One accepted write, for invariant checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub saga_id: String,
    pub fence: Fence,
    /// The shard's epoch when the write was applied.
    pub epoch_at_commit: i64,
    pub version: i64,
}

#[derive(Default)]
struct State {
    sagas: BTreeMap<String, SagaRecord>,
    attempts: BTreeMap<(String, i32, i32), Attempt>,
    outbox: BTreeMap<i64, (i32, OutboxMessage)>,
    next_seq: i64,
    leases: BTreeMap<i32, LeaseRow>,
    history: Vec<Accepted>,
}

/// The in-memory store. Clones share the data (a "restarted" replica sees what was written).
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every accepted write so far.
    pub fn history(&self) -> Vec<Accepted> {
        self.lock().history.clone()
    }

    /// Every saga.
    pub fn sagas(&self) -> Vec<SagaRecord> {
        self.lock().sagas.values().cloned().collect()
    }
}

fn holds(s: &State, fence: Fence) -> bool {
    s.leases
        .get(&fence.shard)
        .is_some_and(|l| l.epoch == fence.epoch)
}

#[async_trait]
impl Store for MemoryStore {
    async fn write(&self, w: Write) -> Result<Written, JournalError> {
        let mut s = self.lock();
        if !holds(&s, w.fence) {
            return Err(JournalError::stale(w.fence));
        }
        // The epoch the store holds now (equal to the fence's while the fence check stands).
        let epoch = s.leases.get(&w.fence.shard).map_or(-1, |l| l.epoch);
        let (id, version, written) = match w.change {
            Change::Start(record) => {
                let mut record = std::sync::Arc::unwrap_or_clone(record);
                if record.shard != w.fence.shard {
                    return Err(JournalError::other_shard(w.fence, record.shard));
                }
                if s.sagas.contains_key(&record.id) {
                    return Ok(Written::Existed);
                }
                // Positions are not stored (as in the SQL store).
                for x in &mut record.signals {
                    x.position = None;
                }
                let (id, version) = (record.id.clone(), record.version);
                s.sagas.insert(id.clone(), record);
                (id, version, Written::Created)
            }
            Change::Update {
                id,
                expected_version,
                update: u,
                at,
            } => {
                let Some(saga) = s.sagas.get_mut(&id) else {
                    return Err(JournalError::Refused(format!("no saga {id}")));
                };
                if saga.shard != w.fence.shard {
                    return Err(JournalError::other_shard(w.fence, saga.shard));
                }
                if saga.version != expected_version {
                    return Err(JournalError::Refused(format!(
                        "saga {id} is at version {}, not {expected_version}",
                        saga.version
                    )));
                }
                saga.version += 1;
                saga.updated_at = at;
                if let Some(v) = u.state {
                    saga.state = v;
                }
                if let Some(v) = u.input {
                    saga.input = v;
                }
                if let Some(v) = u.outputs {
                    saga.outputs = serde_json::from_str(v.get())
                        .map_err(|_| JournalError::Corrupt(format!("saga {id} outputs")))?;
                }
                if let Some(v) = u.next_step {
                    saga.next_step = usize::try_from(v).unwrap_or(0);
                }
                if let Some(v) = u.error {
                    saga.error = v;
                }
                if let Some(v) = u.deadline {
                    saga.deadline = v;
                }
                if let Some(v) = u.signals {
                    saga.signals = v
                        .into_iter()
                        .map(|mut x| {
                            x.position = None;
                            x
                        })
                        .collect();
                }
                saga.wake_at = u.wake_at;
                (id, saga.version, Written::Updated)
            }
        };
        for a in w.attempts {
            s.attempts
                .entry((a.saga_id.clone(), a.step_index, a.attempt))
                .or_insert(a);
        }
        for m in w.outbox {
            s.next_seq += 1;
            let seq = s.next_seq;
            s.outbox.insert(seq, (w.fence.shard, m));
        }
        s.history.push(Accepted {
            saga_id: id,
            fence: w.fence,
            epoch_at_commit: epoch,
            version,
        });
        Ok(written)
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, JournalError> {
        Ok(self.lock().sagas.get(id).cloned())
    }

    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>, JournalError> {
        Ok(self
            .lock()
            .attempts
            .range((id.to_owned(), i32::MIN, i32::MIN)..=(id.to_owned(), i32::MAX, i32::MAX))
            .map(|(_, a)| a.clone())
            .collect())
    }

    async fn orphans(&self, kind: &str, shard: i32) -> Result<Vec<SagaRecord>, JournalError> {
        let mut out: Vec<SagaRecord> = self
            .lock()
            .sagas
            .values()
            .filter(|r| {
                r.kind == kind
                    && r.shard == shard
                    && r.state == crate::RUNNING
                    && r.wake_at.is_none()
            })
            .cloned()
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn due(
        &self,
        shard: i32,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, JournalError> {
        let mut out: Vec<SagaRecord> = self
            .lock()
            .sagas
            .values()
            .filter(|r| r.shard == shard && r.wake_at.is_some_and(|w| w <= now))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.wake_at.cmp(&b.wake_at).then(a.id.cmp(&b.id)));
        out.truncate(limit);
        Ok(out)
    }

    async fn list(&self, f: &ListFilter) -> Result<Vec<SagaRecord>, JournalError> {
        let mut out: Vec<SagaRecord> = self
            .lock()
            .sagas
            .values()
            .filter(|r| f.state.as_ref().is_none_or(|s| &r.state == s))
            .filter(|r| f.shard.is_none_or(|s| r.shard == s))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
        out.truncate(usize::try_from(f.limit).unwrap_or(usize::MAX));
        Ok(out)
    }

    async fn acquire(
        &self,
        shard: i32,
        owner: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<Option<Lease>, JournalError> {
        let mut s = self.lock();
        let row = s.leases.entry(shard).or_insert_with(|| LeaseRow {
            shard,
            owner: owner.to_owned(),
            epoch: 0,
            expires_at: now - chrono::Duration::seconds(1),
            checkpoint: Position::default(),
        });
        if row.expires_at >= now && row.owner != owner {
            return Ok(None);
        }
        row.owner = owner.to_owned();
        row.epoch += 1;
        row.expires_at = now + ttl;
        Ok(Some(Lease {
            shard,
            epoch: row.epoch,
            checkpoint: row.checkpoint,
        }))
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<bool, JournalError> {
        let mut s = self.lock();
        match s.leases.get_mut(&lease.shard) {
            Some(row) if row.epoch == lease.epoch => {
                row.expires_at = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn checkpoint(&self, lease: &Lease, at: Position) -> Result<bool, JournalError> {
        let mut s = self.lock();
        match s.leases.get_mut(&lease.shard) {
            Some(row) if row.epoch == lease.epoch => {
                row.checkpoint = at;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease, now: DateTime<Utc>) -> Result<(), JournalError> {
        let mut s = self.lock();
        if let Some(row) = s.leases.get_mut(&lease.shard) {
            if row.epoch == lease.epoch {
                row.expires_at = now - chrono::Duration::seconds(1);
            }
        }
        Ok(())
    }

    async fn leases(&self) -> Result<Vec<LeaseRow>, JournalError> {
        Ok(self.lock().leases.values().cloned().collect())
    }

    async fn outbox(&self, fence: Fence, limit: usize) -> Result<Vec<OutboxRow>, JournalError> {
        self.outbox_after(&[fence], 0, limit).await
    }

    async fn outbox_after(
        &self,
        fences: &[Fence],
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, JournalError> {
        let s = self.lock();
        let shards: Vec<i32> = fences
            .iter()
            .filter(|f| holds(&s, **f))
            .map(|f| f.shard)
            .collect();
        match fences {
            [fence] if shards.is_empty() => return Err(JournalError::stale(*fence)),
            _ if shards.is_empty() => return Err(JournalError::Refused("no shard is held".into())),
            _ => {}
        }
        Ok(s.outbox
            .range(after.saturating_add(1)..)
            .filter(|(_, (shard, _))| shards.contains(shard))
            .take(limit)
            .map(|(seq, (_, m))| OutboxRow {
                seq: *seq,
                message: m.clone(),
            })
            .collect())
    }

    async fn outbox_done(&self, fence: Fence, seqs: &[i64]) -> Result<(), JournalError> {
        let mut s = self.lock();
        if !holds(&s, fence) {
            return Err(JournalError::stale(fence));
        }
        for seq in seqs {
            // Only the fence's shard's rows (another shard's owner relays the others).
            if s.outbox
                .get(seq)
                .is_some_and(|(shard, _)| *shard == fence.shard)
            {
                s.outbox.remove(seq);
            }
        }
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<u64, JournalError> {
        Ok(self.lock().outbox.len() as u64)
    }
}
