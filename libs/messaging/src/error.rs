pub type Result<T, E = MessagingError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    /// The broker cannot be reached or refused the operation; retry later. An append that fails
    /// with this may or may not have been stored: callers that need exactly-once effects dedupe
    /// by event id.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker did not confirm within the time allowed.
    #[error("broker did not confirm in time")]
    Timeout,
    /// The broker explicitly refused the message (negative confirm, queue full).
    #[error("broker refused the message: {0}")]
    Nacked(String),
    #[error("invalid messaging configuration: {0}")]
    Config(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("storage error: {0}")]
    Storage(String),
    /// The consumer or channel was closed.
    #[error("closed")]
    Closed,
}

impl MessagingError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            MessagingError::Unavailable(_)
                | MessagingError::Timeout
                | MessagingError::Nacked(_)
                | MessagingError::Closed
        )
    }
}
