//! Which running sagas wait and why (`GET /api/waiting`): a saga parked in the journal with a
//! wake-up time in the future (no drone free yet, a long back-off, later an open breaker) is not
//! making progress, and on-call staff must tell "2,000 bookings wait for a drone" apart from "2,000
//! bookings are being worked on". Read from the journal of every partition, so any replica answers
//! for all of them; why a saga waits is its last failed attempt's error, reduced to a stable reason.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use contracts::{WaitReason, WaitingSagas};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};

/// Waiting sagas examined one by one for their reason (the first to wake); the rest are counted
/// under `not-examined`, so a huge backlog costs one bounded query.
const EXAMINE_AT_MOST: u64 = 5_000;

/// The last attempt of saga `i` (the journal's primary key orders them).
const LAST_ATTEMPT: &str = "FROM saga_attempts a WHERE a.saga_id = i.id \
                            ORDER BY a.step_index DESC, a.attempt DESC LIMIT 1";

/// The running sagas at `now`, waiting apart from progressing. `steps` names the saga's steps by
/// index (for a saga that waits before its step's first attempt).
pub async fn waiting(
    db: &DatabaseConnection,
    steps: &[&str],
    now: DateTime<Utc>,
) -> Result<WaitingSagas, DbErr> {
    let now_ms = now.timestamp_millis();
    let backend = db.get_database_backend();
    // `now_ms` is an integer formatted here, never text from outside.
    let count = |condition: String| {
        let sql = format!(
            "SELECT COUNT(*) AS n FROM saga_instances WHERE state = 'running' AND {condition}"
        );
        async move {
            let row = db.query_one(Statement::from_string(backend, sql)).await?;
            row.map_or(Ok(0), |r| r.try_get::<i64>("", "n"))
        }
    };
    let progressing = count(format!("(wake_at_ms IS NULL OR wake_at_ms <= {now_ms})")).await?;
    let waiting = count(format!("wake_at_ms > {now_ms}")).await?;
    let rows = db
        .query_all(Statement::from_string(
            backend,
            format!(
                "SELECT i.id AS id, i.next_step AS next_step, i.wake_at_ms AS wake_at_ms, \
                 (SELECT a.step {LAST_ATTEMPT}) AS step, (SELECT a.error {LAST_ATTEMPT}) AS error \
                 FROM saga_instances i WHERE i.state = 'running' AND i.wake_at_ms > {now_ms} \
                 ORDER BY i.wake_at_ms LIMIT {EXAMINE_AT_MOST}"
            ),
        ))
        .await?;
    let mut groups: BTreeMap<(String, String), WaitReason> = BTreeMap::new();
    let mut examined = 0i64;
    for row in rows {
        let id: String = row.try_get("", "id")?;
        let next_step: i32 = row.try_get("", "next_step")?;
        let wake_at_ms: Option<i64> = row.try_get("", "wake_at_ms")?;
        let attempt_step: Option<String> = row.try_get("", "step")?;
        let error: Option<String> = row.try_get("", "error")?;
        let step = attempt_step.unwrap_or_else(|| {
            usize::try_from(next_step)
                .ok()
                .and_then(|i| steps.get(i))
                .map_or_else(|| format!("step {next_step}"), |s| (*s).to_owned())
        });
        let reason = reason_of(error.as_deref());
        let wake = wake_at_ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single());
        examined += 1;
        let group = groups
            .entry((step.clone(), reason.clone()))
            .or_insert_with(|| WaitReason {
                step,
                reason,
                count: 0,
                next_wake_at: wake,
                // Rows come first-to-wake first: the first of a group is its example.
                example_delivery_id: id,
                last_error: error,
            });
        group.count += 1;
    }
    let mut reasons: Vec<WaitReason> = groups.into_values().collect();
    if waiting > examined {
        reasons.push(WaitReason {
            step: "*".into(),
            reason: "not-examined".into(),
            count: waiting - examined,
            next_wake_at: None,
            example_delivery_id: String::new(),
            last_error: None,
        });
    }
    reasons.sort_by(|a, b| b.count.cmp(&a.count).then(a.step.cmp(&b.step)));
    Ok(WaitingSagas {
        progressing,
        waiting,
        reasons,
        at: now,
    })
}

/// A failed attempt's error reduced to a stable, low-cardinality reason (a metric label): the
/// problem code a domain service answered, else what kind of failure it was.
pub fn reason_of(error: Option<&str>) -> String {
    let Some(error) = error else {
        return "timer".into();
    };
    // `downstream` writes "<call> answered <status> [(<code>)][: <detail>]".
    if let Some(rest) = error.split_once(" answered ").map(|(_, r)| r) {
        let head = rest.split_once(": ").map_or(rest, |(h, _)| h);
        if let (Some(open), Some(close)) = (head.find('('), head.rfind(')')) {
            let code = &head[open + 1..close.max(open + 1)];
            if !code.is_empty()
                && code
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return code.to_owned();
            }
        }
        if let Some(status) = head
            .split_whitespace()
            .next()
            .filter(|s| s.len() == 3 && s.chars().all(|c| c.is_ascii_digit()))
        {
            return format!("http-{status}");
        }
    }
    if error.contains(crate::NO_DRONE_AVAILABLE) {
        crate::NO_DRONE_AVAILABLE.into()
    } else if error.contains("circuit breaker is") {
        // A deferral: the service's breaker was open (or its probes under way).
        "circuit-open".into()
    } else if error.contains("calls in flight from this process") {
        "call-cap".into()
    } else if error.contains("got no answer within") {
        "timeout".into()
    } else if error.contains("could not connect") {
        "unreachable".into()
    } else {
        "transient-error".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm_migration::MigratorTrait;

    #[test]
    fn reasons_are_stable_codes_or_kinds() {
        let cases = [
            (None, "timer"),
            (
                Some("PUT http://drone/api/dronedeliveries/x answered 503 Service Unavailable (no-drone-available): no drone free"),
                "no-drone-available",
            ),
            (
                Some("PUT http://package/api/packages/x answered 502 Bad Gateway"),
                "http-502",
            ),
            (
                Some("PUT http://package/api/packages/x answered 500 Internal Server Error: boom (really)"),
                "http-500",
            ),
            (Some("GET http://account/api/accounts/a got no answer within 2000 ms: timed out"), "timeout"),
            (Some("GET http://account/api/accounts/a could not connect: refused"), "unreachable"),
            (Some("something else"), "transient-error"),
            (
                Some("package circuit breaker is open (31 of 40 calls failed in 10 s); next probe in 4.2 s"),
                "circuit-open",
            ),
            (
                Some("package already has 64 calls in flight from this process (waited 1 s for one to finish); try again in 0.5 s"),
                "call-cap",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(reason_of(error), reason, "{error:?}");
        }
    }

    async fn saga(
        db: &DatabaseConnection,
        id: &str,
        next_step: i32,
        wake_at: Option<DateTime<Utc>>,
        state: &str,
    ) -> anyhow::Result<()> {
        let wake = wake_at.map_or("NULL".to_owned(), |w| w.timestamp_millis().to_string());
        let now = Utc::now().to_rfc3339();
        db.execute_unprepared(&format!(
            "INSERT INTO saga_instances (id, kind, shard, state, input, outputs, next_step, version, \
             error, deadline, created_at, updated_at, wake_at_ms, signals) VALUES \
             ('{id}', 'booking', 0, '{state}', '{{}}', '{{}}', {next_step}, 1, NULL, NULL, '{now}', '{now}', {wake}, '[]')"
        ))
        .await?;
        Ok(())
    }

    async fn attempt(
        db: &DatabaseConnection,
        id: &str,
        step_index: i32,
        n: i32,
        step: &str,
        error: &str,
    ) -> anyhow::Result<()> {
        let now = Utc::now().to_rfc3339();
        db.execute_unprepared(&format!(
            "INSERT INTO saga_attempts (saga_id, step_index, attempt, step, outcome, error, started_at, finished_at) \
             VALUES ('{id}', {step_index}, {n}, '{step}', 'transient', '{error}', '{now}', '{now}')"
        ))
        .await?;
        Ok(())
    }

    /// Parked sagas are counted apart from the ones at work, grouped by step and the reason of
    /// their last failed attempt, the first to wake as the example.
    #[tokio::test]
    async fn waiting_sagas_are_counted_apart_with_their_reason() -> anyhow::Result<()> {
        let db = sea_orm::Database::connect("sqlite::memory:").await?;
        crate::Migrator::up(&db, None).await?;
        let now = Utc::now();
        let later = |s: i64| Some(now + chrono::Duration::seconds(s));
        let no_drone =
            "PUT http://d answered 503 Service Unavailable (no-drone-available): none free";
        // Two wait for a drone (the second one's earlier attempts failed otherwise).
        saga(&db, "d1", 2, later(30), "running").await?;
        attempt(&db, "d1", 2, 1, "ReserveDrone", no_drone).await?;
        saga(&db, "d2", 2, later(10), "running").await?;
        attempt(
            &db,
            "d2",
            2,
            1,
            "ReserveDrone",
            "PUT http://d could not connect: x",
        )
        .await?;
        attempt(&db, "d2", 2, 2, "ReserveDrone", no_drone).await?;
        // One backs off after a timeout of Package.
        saga(&db, "p1", 1, later(5), "running").await?;
        attempt(
            &db,
            "p1",
            1,
            1,
            "RegisterPackage",
            "PUT http://p got no answer within 1 ms",
        )
        .await?;
        // At work: no timer, a due timer (a signal waits); finished sagas do not count.
        saga(&db, "w1", 0, None, "running").await?;
        saga(
            &db,
            "w2",
            3,
            Some(now - chrono::Duration::seconds(1)),
            "running",
        )
        .await?;
        saga(&db, "c1", 4, None, "completed").await?;
        saga(&db, "f1", 2, later(60), "failed").await?;

        let steps = [
            "CheckAccount",
            "RegisterPackage",
            "ReserveDrone",
            "CreateDelivery",
        ];
        let w = waiting(&db, &steps, now).await?;
        assert_eq!((w.progressing, w.waiting), (2, 3));
        let groups: Vec<_> = w
            .reasons
            .iter()
            .map(|r| {
                (
                    r.step.as_str(),
                    r.reason.as_str(),
                    r.count,
                    r.example_delivery_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            groups,
            [
                ("ReserveDrone", "no-drone-available", 2, "d2"),
                ("RegisterPackage", "timeout", 1, "p1"),
            ]
        );
        assert_eq!(
            w.reasons[0].next_wake_at.map(|t| t.timestamp_millis()),
            later(10).map(|t| t.timestamp_millis())
        );
        assert_eq!(w.reasons[0].last_error.as_deref(), Some(no_drone));
        Ok(())
    }
}
