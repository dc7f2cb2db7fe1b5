use secrecy::SecretString;
use serde::Deserialize;

/// Messaging settings (`APP_MESSAGING__URL`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MessagingSettings {
    /// `amqp://user:pass@host:5672/%2f` (RabbitMQ) or `sqlite://data/messaging.db?mode=rwc` (embedded).
    pub url: SecretString,
    /// Prefix of every queue and stream name (isolates environments and test runs).
    pub prefix: String,
    /// Shown by the broker for this process's connections (`rabbitmqctl list_connections
    /// user_provided_name`).
    pub connection_name: String,
    /// Stream retention: the broker drops the oldest segments beyond this many bytes per partition.
    pub stream_max_bytes: u64,
    /// Stream retention by age, in RabbitMQ's syntax (`7D`, `12h`).
    pub stream_max_age: String,
    /// A log batch is sealed at this many events...
    pub batch_max_events: usize,
    /// ...or this many bytes of encoded events...
    pub batch_max_bytes: usize,
    /// ...or when its first event has waited this long (microseconds); a batch waits at all only
    /// while its partition's appends arrive faster than this (see the batcher). 10 ms by default:
    /// at 1,000 bookings/s over eight partitions (an append every 8 ms each) a batch then carries
    /// two to three bookings, and RabbitMQ's CPU per saga fell by a fifth (bench-e2e, issue 19);
    /// a partition whose appends come less often than every 10 ms never waits.
    pub batch_linger_us: u64,
    /// Unconfirmed broker messages allowed in flight per partition publisher.
    pub max_in_flight: usize,
    /// How long an append waits for the broker's confirm.
    pub confirm_timeout_ms: u64,
    /// Stream consumer prefetch (broker messages, each possibly a batch of events).
    pub log_prefetch: u16,
    /// Delivery limit of every parked (dead-letter) queue, declared explicitly so that no broker
    /// version's default applies (RabbitMQ 4 gives quorum queues 20 and then drops the message,
    /// a parked queue having no dead-letter queue of its own). A parked message is delivered only
    /// to the process that moves it into its store, and returned only when that process dies
    /// holding it, so this is a safety net that should never be reached. Every process that
    /// declares a queue must use the same value (RabbitMQ refuses a declaration with other
    /// arguments).
    pub parked_delivery_limit: u32,
}

impl Default for MessagingSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("sqlite://data/messaging.db?mode=rwc".to_owned()),
            prefix: String::new(),
            connection_name: "drone-delivery".into(),
            stream_max_bytes: 2 * 1024 * 1024 * 1024,
            stream_max_age: "7D".into(),
            batch_max_events: 256,
            batch_max_bytes: 512 * 1024,
            batch_linger_us: 10_000,
            max_in_flight: 64,
            confirm_timeout_ms: 10_000,
            log_prefetch: 64,
            parked_delivery_limit: 1000,
        }
    }
}

impl MessagingSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            ..Self::default()
        }
    }

    /// `name` with the configured prefix.
    pub fn qualified(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}
