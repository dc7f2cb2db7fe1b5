//! Waiting for what the services do in the background: a probe is asked again and again until
//! it answers `Ok`, or the time is up. A probe answers `Err(seen)` with what it saw instead, so
//! that a timeout can say what was awaited and what was last seen.

use std::fmt::Display;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] asks its probe.
pub const EVERY: Duration = Duration::from_millis(100);

/// Asks `probe` every 100 ms until it answers `Ok`, and returns that value; panics naming `what`
/// and the last `Err` once `within` has passed.
pub async fn eventually<T, E: Display>(
    within: Duration,
    what: impl Display,
    probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    eventually_every(within, EVERY, what, probe).await
}

/// [`eventually`], asking every `every` (faster to catch a short-lived state, slower to spare a
/// busy service).
pub async fn eventually_every<T, E: Display>(
    within: Duration,
    every: Duration,
    what: impl Display,
    probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    match poll(within, every, probe).await {
        Ok(v) => v,
        Err(last) => panic!("timed out after {within:?} waiting for {what}; last seen: {last}"),
    }
}

/// A probe's answer: `Ok(seen)` when `done`, else `Err(seen)`.
pub fn done_if<T>(done: bool, seen: T) -> Result<T, T> {
    if done {
        Ok(seen)
    } else {
        Err(seen)
    }
}

/// The first `Ok` of `probe`, asked every `every`, or its last `Err` once `within` has passed
/// (for a caller that reports a timeout itself). The last answer is always one asked after the
/// deadline, so a probe gets at least the whole of `within`.
pub async fn poll<T, E>(
    within: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}
