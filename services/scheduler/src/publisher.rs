//! Sends outbox rows to the broker: lifecycle events to the `workflow-events` log (one confirmed
//! batch), compensation requests to the Supervisor's queue.

use std::sync::Arc;

use async_trait::async_trait;
use messaging::{Envelope, PartitionedLog, WorkQueue};
use saga::OutboxMessage;

use contracts::COMPENSATIONS_QUEUE;

pub struct BrokerPublisher {
    pub events: Arc<dyn PartitionedLog>,
    pub compensations: Arc<dyn WorkQueue>,
}

#[async_trait]
impl saga::outbox::Publisher for BrokerPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), String> {
        let mut events = Vec::new();
        for m in messages {
            let envelope: Envelope = match serde_json::from_value(m.payload.clone()) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(destination = %m.destination, error = %e, "outbox row is not an envelope; dropped");
                    continue;
                }
            };
            if m.destination == COMPENSATIONS_QUEUE {
                self.compensations
                    .publish(envelope)
                    .await
                    .map_err(|e| e.to_string())?;
            } else {
                events.push(envelope);
            }
        }
        if !events.is_empty() {
            self.events
                .append_batch(events)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
