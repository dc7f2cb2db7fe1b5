//! Sends outbox rows to the broker: lifecycle events to the `workflow-events` log (one confirmed
//! batch), compensation requests to the Supervisor's queue.

use std::sync::Arc;

use async_trait::async_trait;
use messaging::{Encoded, Envelope, PartitionedLog, WorkQueue};
use saga::OutboxMessage;
use serde_json::value::RawValue;

use contracts::COMPENSATIONS_QUEUE;

pub struct BrokerPublisher {
    pub events: Arc<dyn PartitionedLog>,
    pub compensations: Arc<dyn WorkQueue>,
}

/// An outbox row made ready for its destination.
enum Row {
    Event(Encoded),
    Compensation(Envelope),
}

/// A row is an encoded envelope, checked as one here: a row that was not would spoil the whole
/// broker message it shares with others. An event's body goes on as the text it is (no tree of
/// values built and encoded again); a compensation (rare) is decoded whole, as its queue takes it.
fn checked(m: &OutboxMessage) -> Result<Row, String> {
    let text = m.payload.get();
    if m.destination == COMPENSATIONS_QUEUE {
        return serde_json::from_str::<Envelope>(text)
            .map(Row::Compensation)
            .map_err(|e| e.to_string());
    }
    serde_json::from_str::<Envelope<&RawValue>>(text)
        .map_err(|e| e.to_string())?
        .encoded()
        .map(Row::Event)
        .map_err(|e| e.to_string())
}

#[async_trait]
impl saga::outbox::Publisher for BrokerPublisher {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), String> {
        let mut events = Vec::with_capacity(messages.len());
        for m in messages {
            match checked(m) {
                Ok(Row::Event(event)) => events.push(event),
                Ok(Row::Compensation(request)) => self
                    .compensations
                    .publish(request)
                    .await
                    .map_err(|e| e.to_string())?,
                Err(e) => {
                    tracing::error!(destination = %m.destination, error = %e, "outbox row is not an envelope; dropped");
                }
            }
        }
        // In row order: each append reaches its partition's batcher in the order polled, so the
        // events of one saga keep their order.
        let appends = events.into_iter().map(|e| self.events.append_encoded(e));
        for appended in futures::future::join_all(appends).await {
            appended.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a failed test step should panic
mod tests {
    use messaging::memory::MemoryLog;
    use saga::RawJson;

    use super::*;

    fn row(destination: &str, payload: RawJson) -> OutboxMessage {
        OutboxMessage {
            destination: destination.to_owned(),
            key: "d-1".to_owned(),
            payload,
        }
    }

    /// The relay hands an event row to the log as the text it is: what a consumer reads is the
    /// envelope the saga wrote, body and all; a row that is not an envelope goes nowhere.
    #[tokio::test]
    async fn an_event_row_reaches_the_log_as_written_and_garbage_does_not() {
        let body = serde_json::json!({"deliveryId": "d-1", "state": "scheduled", "note": "a \"quoted\" é"});
        let written = Envelope::typed("workflow.state-changed", 1, "d-1", &body).with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let event = row(
            "workflow-events",
            RawJson::encode(&written).expect("encoded"),
        );
        let Ok(Row::Event(encoded)) = checked(&event) else {
            panic!("an envelope is an event");
        };
        let log = MemoryLog::new("workflow-events", 1);
        log.append_encoded(encoded).await.expect("appended");
        let expected = Envelope {
            id: written.id,
            kind: written.kind.clone(),
            schema_version: 1,
            key: "d-1".to_owned(),
            time: written.time,
            headers: written.headers.clone(),
            body: body.clone(),
        };
        assert_eq!(log.messages(0), vec![vec![expected]]);

        for garbage in [
            serde_json::json!({"not": "an envelope"}),
            serde_json::json!([1, 2]),
        ] {
            let bad = row(
                "workflow-events",
                RawJson::encode(&garbage).expect("encoded"),
            );
            assert!(checked(&bad).is_err(), "{garbage} is not an envelope");
        }
        let request = row(
            COMPENSATIONS_QUEUE,
            RawJson::encode(&written).expect("encoded"),
        );
        assert!(matches!(checked(&request), Ok(Row::Compensation(e)) if e.id == written.id));
    }
}
