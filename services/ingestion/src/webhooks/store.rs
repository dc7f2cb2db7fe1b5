//! Every query on the webhook tables. One row per (endpoint, event) carries its schedule: the
//! dispatcher claims a due row with a conditional UPDATE (a lease with a token), so two replicas
//! never send the same attempt at once, and finishes it only under the same token.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone as _, Utc};
use contracts::{
    WebhookDelivery, WebhookDeliveryPage, WebhookDeliveryStatus, WebhookEventType,
    WebhookSubscription,
};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Statement,
    TransactionTrait, Value,
};
use uuid::Uuid;

pub mod account {
    use sea_orm::entity::prelude::*;

    /// An account that registered endpoints, with the key its POSTs are signed with.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub account_id: String,
        pub secret: String,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod endpoint {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_endpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub account_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub url: String,
        /// Where the URL stood in the registration (answers list them in that order).
        pub position: i32,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod delivery {
    use sea_orm::entity::prelude::*;

    /// One event for one endpoint. Times are unix milliseconds.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_deliveries")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub account_id: String,
        pub url: String,
        pub event_id: String,
        pub event_type: String,
        /// The booking (deliveryId): its events go to one endpoint in log order.
        pub delivery_id: String,
        pub log_offset: i64,
        pub log_index: i32,
        /// The exact body sent on every attempt.
        pub payload: String,
        pub status: String,
        pub attempts: i32,
        pub last_status_code: Option<i32>,
        pub last_error: Option<String>,
        pub next_attempt_ms: Option<i64>,
        /// After a failed attempt at or past this time, the delivery is given up.
        pub give_up_ms: i64,
        pub lease_until_ms: Option<i64>,
        pub lease_token: Option<String>,
        pub created_ms: i64,
        pub delivered_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod checkpoint {
    use sea_orm::entity::prelude::*;

    /// Where the webhook follower of `workflow-events` resumes, per partition.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_checkpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub partition: i32,
        pub resume_offset: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Namespace of delivery ids derived from (account, url, event id).
const DELIVERY_NAMESPACE: Uuid = Uuid::from_u128(0x3b5c_91e2_7d0a_4f6b_a1c8_5e94_20d7_6f13);

const PENDING: &str = "pending";
const DELIVERED: &str = "delivered";
const FAILED: &str = "failed";

/// The error recorded when a pending delivery's endpoint is no longer registered.
pub(crate) const ENDPOINT_REMOVED: &str = "endpoint removed before delivery";

/// A client event read from the log, to be delivered to its owner's endpoints.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub event_id: Uuid,
    pub kind: WebhookEventType,
    pub delivery_id: Uuid,
    pub owner_id: String,
    pub log_offset: u64,
    pub log_index: u32,
    pub payload: String,
}

/// A claimed delivery, with what sending it needs.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub row: delivery::Model,
    /// `None` once the account no longer has this endpoint (or any).
    pub secret: Option<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub(crate) enum Finish {
    Delivered {
        status_code: u16,
    },
    /// Try again at `next_attempt_ms`.
    Retry {
        status_code: Option<u16>,
        error: String,
        next_attempt_ms: i64,
    },
    /// Given up.
    Failed {
        status_code: Option<u16>,
        error: String,
    },
}

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// A new signing secret: 32 random bytes, hex, with a prefix that says what it is.
fn new_secret() -> String {
    use rand::Rng as _;
    let bytes: [u8; 32] = rand::rng().random();
    format!("whsec_{}", hex::encode(bytes))
}

pub(crate) struct Store {
    db: DatabaseConnection,
}

impl Store {
    pub(crate) fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// `sql` with `?` placeholders, numbered for PostgreSQL.
    fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
        let backend = self.db.get_database_backend();
        let sql = if backend == DbBackend::Postgres {
            let mut n = 0;
            sql.chars()
                .map(|c| {
                    if c == '?' {
                        n += 1;
                        format!("${n}")
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        } else {
            sql.to_owned()
        };
        Statement::from_sql_and_values(backend, sql, values)
    }

    /// The account's endpoints and secret; `None` without endpoints.
    pub(crate) async fn subscription(
        &self,
        account: &str,
    ) -> Result<Option<WebhookSubscription>, DbErr> {
        subscription(&self.db, account).await
    }

    /// Replaces the account's endpoints with `urls` (creating its secret on the first
    /// registration); pending deliveries to URLs no longer registered are given up. True when
    /// the secret was created now.
    pub(crate) async fn replace(
        &self,
        account: &str,
        urls: &[String],
    ) -> Result<(WebhookSubscription, bool), DbErr> {
        let now = service_kit::now();
        let txn = self.db.begin().await?;
        account::Entity::insert(account::ActiveModel {
            account_id: Set(account.to_owned()),
            secret: Set(new_secret()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(account::Column::AccountId)
                .update_column(account::Column::UpdatedAt)
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        endpoint::Entity::delete_many()
            .filter(endpoint::Column::AccountId.eq(account))
            .exec(&txn)
            .await?;
        let rows = urls
            .iter()
            .enumerate()
            .map(|(i, url)| endpoint::ActiveModel {
                account_id: Set(account.to_owned()),
                url: Set(url.clone()),
                position: Set(i32::try_from(i).unwrap_or(i32::MAX)),
                created_at: Set(now),
            });
        endpoint::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
        give_up_removed(&txn, account, Some(urls)).await?;
        let sub = subscription(&txn, account)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("webhooks of {account}")))?;
        txn.commit().await?;
        // Created now, or kept from an earlier registration (`now` keeps the stored precision).
        let created = sub.created_at == now;
        Ok((sub, created))
    }

    /// Removes the account's endpoints and secret (a later registration gets a new secret);
    /// its pending deliveries are given up. True when there was something to remove.
    pub(crate) async fn remove(&self, account: &str) -> Result<bool, DbErr> {
        let txn = self.db.begin().await?;
        let endpoints = endpoint::Entity::delete_many()
            .filter(endpoint::Column::AccountId.eq(account))
            .exec(&txn)
            .await?
            .rows_affected;
        let accounts = account::Entity::delete_by_id(account.to_owned())
            .exec(&txn)
            .await?
            .rows_affected;
        give_up_removed(&txn, account, None).await?;
        txn.commit().await?;
        Ok(endpoints + accounts > 0)
    }

    /// Records client events for their owners' endpoints (idempotent: every replica inserts
    /// the same rows) and the given checkpoints (partition, offset to resume at) in `txn`, the
    /// follower's round's transaction. The number of deliveries created.
    pub(crate) async fn record(
        txn: &DatabaseTransaction,
        events: &[NewEvent],
        checkpoints: &[(u32, u64)],
        retry_for_ms: i64,
    ) -> Result<u64, DbErr> {
        let mut inserted = 0;
        if !events.is_empty() {
            let mut owners: Vec<&str> = events.iter().map(|e| e.owner_id.as_str()).collect();
            owners.sort_unstable();
            owners.dedup();
            let mut urls: HashMap<String, Vec<String>> = HashMap::new();
            for e in endpoint::Entity::find()
                .filter(endpoint::Column::AccountId.is_in(owners))
                .order_by_asc(endpoint::Column::Position)
                .all(txn)
                .await?
            {
                urls.entry(e.account_id).or_default().push(e.url);
            }
            let now = millis(service_kit::now());
            let mut rows = Vec::new();
            for e in events {
                for url in urls.get(&e.owner_id).into_iter().flatten() {
                    rows.push(new_row(e, url, now, retry_for_ms));
                }
            }
            for chunk in rows.chunks(200) {
                inserted += delivery::Entity::insert_many(chunk.iter().cloned())
                    .on_conflict(
                        OnConflict::column(delivery::Column::Id)
                            .do_nothing()
                            .to_owned(),
                    )
                    .exec_without_returning(txn)
                    .await?;
            }
        }
        if !checkpoints.is_empty() {
            let rows = checkpoints
                .iter()
                .map(|&(partition, offset)| checkpoint::ActiveModel {
                    partition: Set(i32::try_from(partition).unwrap_or(i32::MAX)),
                    resume_offset: Set(i64::try_from(offset).unwrap_or(i64::MAX)),
                });
            // Replicas share the table: a checkpoint only moves forward (any replica that wrote
            // one had recorded everything before it).
            checkpoint::Entity::insert_many(rows)
                .on_conflict(
                    OnConflict::column(checkpoint::Column::Partition)
                        .update_column(checkpoint::Column::ResumeOffset)
                        .action_and_where(
                            Expr::col((checkpoint::Entity, checkpoint::Column::ResumeOffset)).lt(
                                Expr::col((
                                    sea_orm::sea_query::Alias::new("excluded"),
                                    checkpoint::Column::ResumeOffset,
                                )),
                            ),
                        )
                        .to_owned(),
                )
                .exec_without_returning(txn)
                .await?;
        }
        Ok(inserted)
    }

    /// Where the follower resumes reading `partition`.
    pub(crate) async fn checkpoint(&self, partition: u32) -> Result<Option<u64>, DbErr> {
        Ok(
            checkpoint::Entity::find_by_id(i32::try_from(partition).unwrap_or(i32::MAX))
                .one(&self.db)
                .await?
                .map(|c| u64::try_from(c.resume_offset).unwrap_or(0)),
        )
    }

    /// Ids of up to `limit` deliveries due at `now` that nobody holds and whose booking has no
    /// earlier event still pending for the same endpoint.
    pub(crate) async fn due(&self, now: i64, limit: usize) -> Result<Vec<String>, DbErr> {
        let sql = format!(
            "SELECT id FROM webhook_deliveries WHERE {CLAIMABLE} \
             ORDER BY next_attempt_ms LIMIT {limit}"
        );
        let rows = self
            .db
            .query_all(self.statement(&sql, vec![now.into(), now.into()]))
            .await?;
        rows.iter()
            .map(|r| r.try_get_by_index::<String>(0))
            .collect()
    }

    /// Claims a due delivery until `lease_until` under `token`: the same conditions as
    /// [`due`](Self::due), in one statement, so only one replica wins it.
    pub(crate) async fn claim(
        &self,
        id: &str,
        token: Uuid,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<Claimed>, DbErr> {
        let sql = format!(
            "UPDATE webhook_deliveries SET lease_until_ms = ?, lease_token = ? \
             WHERE id = ? AND {CLAIMABLE}"
        );
        let values = vec![
            lease_until.into(),
            token.to_string().into(),
            id.into(),
            now.into(),
            now.into(),
        ];
        let claimed = self.db.execute(self.statement(&sql, values)).await?;
        if claimed.rows_affected() != 1 {
            return Ok(None);
        }
        let Some(row) = delivery::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let registered = endpoint::Entity::find_by_id((row.account_id.clone(), row.url.clone()))
            .one(&self.db)
            .await?
            .is_some();
        let secret = if registered {
            account::Entity::find_by_id(row.account_id.clone())
                .one(&self.db)
                .await?
                .map(|a| a.secret)
        } else {
            None
        };
        Ok(Some(Claimed { row, secret }))
    }

    /// Records how an attempt ended, if this claim (`token`) still holds the delivery. False
    /// when it no longer did (its lease ran out and another attempt took over).
    pub(crate) async fn finish(
        &self,
        id: &str,
        token: Uuid,
        outcome: &Finish,
        now: i64,
    ) -> Result<bool, DbErr> {
        let (status, code, error, next, delivered) = match outcome {
            Finish::Delivered { status_code } => {
                (DELIVERED, Some(*status_code), None, None, Some(now))
            }
            Finish::Retry {
                status_code,
                error,
                next_attempt_ms,
            } => (
                PENDING,
                *status_code,
                Some(error.clone()),
                Some(*next_attempt_ms),
                None,
            ),
            Finish::Failed { status_code, error } => {
                (FAILED, *status_code, Some(error.clone()), None, None)
            }
        };
        let updated = delivery::Entity::update_many()
            .col_expr(delivery::Column::Status, Expr::value(status))
            .col_expr(
                delivery::Column::Attempts,
                Expr::col(delivery::Column::Attempts).add(1),
            )
            .col_expr(
                delivery::Column::LastStatusCode,
                Expr::value(code.map(i32::from)),
            )
            .col_expr(delivery::Column::LastError, Expr::value(error))
            .col_expr(delivery::Column::NextAttemptMs, Expr::value(next))
            .col_expr(delivery::Column::DeliveredMs, Expr::value(delivered))
            .col_expr(delivery::Column::LeaseUntilMs, Expr::value(None::<i64>))
            .col_expr(delivery::Column::LeaseToken, Expr::value(None::<String>))
            .filter(delivery::Column::Id.eq(id))
            .filter(delivery::Column::LeaseToken.eq(token.to_string()))
            .exec(&self.db)
            .await?;
        Ok(updated.rows_affected == 1)
    }

    /// The account's deliveries, newest first, after `cursor`.
    pub(crate) async fn page(
        &self,
        account: &str,
        limit: u64,
        cursor: Option<Cursor>,
    ) -> Result<WebhookDeliveryPage, DbErr> {
        let mut query = delivery::Entity::find().filter(delivery::Column::AccountId.eq(account));
        if let Some(c) = cursor {
            query = query.filter(
                Condition::any()
                    .add(delivery::Column::CreatedMs.lt(c.created_ms))
                    .add(
                        Condition::all()
                            .add(delivery::Column::CreatedMs.eq(c.created_ms))
                            .add(delivery::Column::Id.lt(c.id)),
                    ),
            );
        }
        let mut rows = query
            .order_by_desc(delivery::Column::CreatedMs)
            .order_by_desc(delivery::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_cursor = more
            .then(|| rows.last().map(|r| format!("{}.{}", r.created_ms, r.id)))
            .flatten();
        Ok(WebhookDeliveryPage {
            items: rows.into_iter().filter_map(to_api).collect(),
            next_cursor,
        })
    }

    /// Makes the account's delivery `id` due again now (a delivered or failed one is sent again
    /// with a fresh retry period). `Ok(None)` when the account has no such delivery;
    /// `Err(RedeliverError::EndpointRemoved)` when its endpoint is no longer registered.
    pub(crate) async fn redeliver(
        &self,
        account: &str,
        id: Uuid,
        retry_for_ms: i64,
    ) -> Result<Option<WebhookDelivery>, RedeliverError> {
        let id = id.to_string();
        let Some(row) = delivery::Entity::find_by_id(id.clone())
            .one(&self.db)
            .await?
            .filter(|r| r.account_id == account)
        else {
            return Ok(None);
        };
        if endpoint::Entity::find_by_id((row.account_id.clone(), row.url.clone()))
            .one(&self.db)
            .await?
            .is_none()
        {
            return Err(RedeliverError::EndpointRemoved);
        }
        let now = millis(service_kit::now());
        delivery::Entity::update_many()
            .col_expr(delivery::Column::Status, Expr::value(PENDING))
            .col_expr(delivery::Column::NextAttemptMs, Expr::value(Some(now)))
            .col_expr(delivery::Column::GiveUpMs, Expr::value(now + retry_for_ms))
            .col_expr(delivery::Column::DeliveredMs, Expr::value(None::<i64>))
            .filter(delivery::Column::Id.eq(id.clone()))
            .filter(delivery::Column::AccountId.eq(account))
            .exec(&self.db)
            .await?;
        Ok(delivery::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .and_then(to_api))
    }

    /// Deliveries not yet delivered or given up.
    pub(crate) async fn pending(&self) -> Result<u64, DbErr> {
        delivery::Entity::find()
            .filter(delivery::Column::Status.eq(PENDING))
            .count(&self.db)
            .await
    }
}

/// Why a redelivery was refused.
#[derive(Debug)]
pub(crate) enum RedeliverError {
    EndpointRemoved,
    Db(DbErr),
}

impl From<DbErr> for RedeliverError {
    fn from(e: DbErr) -> Self {
        RedeliverError::Db(e)
    }
}

/// A position in an account's delivery log (newest first): `"{createdMs}.{id}"`.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    created_ms: i64,
    id: String,
}

impl Cursor {
    /// Exactly the form [`WebhookDeliveryPage::next_cursor`] has (as the document states it).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (ms, id) = s.split_once('.')?;
        let digits = !ms.is_empty() && ms.len() <= 18 && ms.bytes().all(|b| b.is_ascii_digit());
        let uuid = Uuid::try_parse(id).ok()?;
        (digits && uuid.hyphenated().to_string() == id).then(|| Self {
            created_ms: ms.parse().unwrap_or(0),
            id: id.to_owned(),
        })
    }
}

/// Due, not held by anyone, and no earlier event of the same booking is still pending for the
/// same endpoint. Two `?`: now, now.
const CLAIMABLE: &str = "status = 'pending' AND next_attempt_ms <= ? \
    AND (lease_until_ms IS NULL OR lease_until_ms < ?) \
    AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e \
        WHERE e.delivery_id = webhook_deliveries.delivery_id \
        AND e.account_id = webhook_deliveries.account_id \
        AND e.url = webhook_deliveries.url AND e.status = 'pending' \
        AND (e.log_offset < webhook_deliveries.log_offset \
            OR (e.log_offset = webhook_deliveries.log_offset \
                AND e.log_index < webhook_deliveries.log_index)))";

fn new_row(e: &NewEvent, url: &str, now: i64, retry_for_ms: i64) -> delivery::ActiveModel {
    let id = Uuid::new_v5(
        &DELIVERY_NAMESPACE,
        format!("{}\n{url}\n{}", e.owner_id, e.event_id).as_bytes(),
    );
    delivery::ActiveModel {
        id: Set(id.to_string()),
        account_id: Set(e.owner_id.clone()),
        url: Set(url.to_owned()),
        event_id: Set(e.event_id.to_string()),
        event_type: Set(e.kind.as_str().to_owned()),
        delivery_id: Set(e.delivery_id.to_string()),
        log_offset: Set(i64::try_from(e.log_offset).unwrap_or(i64::MAX)),
        log_index: Set(i32::try_from(e.log_index).unwrap_or(i32::MAX)),
        payload: Set(e.payload.clone()),
        status: Set(PENDING.to_owned()),
        attempts: Set(0),
        last_status_code: Set(None),
        last_error: Set(None),
        next_attempt_ms: Set(Some(now)),
        give_up_ms: Set(now + retry_for_ms),
        lease_until_ms: Set(None),
        lease_token: Set(None),
        created_ms: Set(now),
        delivered_ms: Set(None),
    }
}

/// Gives up the account's pending deliveries to URLs not in `kept` (all of them for `None`).
async fn give_up_removed(
    db: &impl ConnectionTrait,
    account: &str,
    kept: Option<&[String]>,
) -> Result<(), DbErr> {
    let mut update = delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(FAILED))
        .col_expr(delivery::Column::LastError, Expr::value(ENDPOINT_REMOVED))
        .col_expr(delivery::Column::NextAttemptMs, Expr::value(None::<i64>))
        .filter(delivery::Column::AccountId.eq(account))
        .filter(delivery::Column::Status.eq(PENDING));
    if let Some(kept) = kept {
        update = update.filter(delivery::Column::Url.is_not_in(kept.iter().cloned()));
    }
    update.exec(db).await.map(drop)
}

async fn subscription(
    db: &impl ConnectionTrait,
    account: &str,
) -> Result<Option<WebhookSubscription>, DbErr> {
    let Some(acc) = account::Entity::find_by_id(account.to_owned())
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let urls: Vec<String> = endpoint::Entity::find()
        .filter(endpoint::Column::AccountId.eq(account))
        .order_by_asc(endpoint::Column::Position)
        .all(db)
        .await?
        .into_iter()
        .map(|e| e.url)
        .collect();
    if urls.is_empty() {
        return Ok(None);
    }
    Ok(Some(WebhookSubscription {
        account_id: acc.account_id,
        urls,
        secret: acc.secret,
        created_at: acc.created_at,
        updated_at: acc.updated_at,
    }))
}

fn to_api(r: delivery::Model) -> Option<WebhookDelivery> {
    let status = WebhookDeliveryStatus::parse(&r.status);
    let kind = WebhookEventType::parse(&r.event_type);
    if status.is_none() || kind.is_none() {
        tracing::warn!(
            id = r.id,
            status = r.status,
            kind = r.event_type,
            "unreadable webhook delivery row"
        );
    }
    Some(WebhookDelivery {
        id: Uuid::parse_str(&r.id).ok()?,
        event_id: Uuid::parse_str(&r.event_id).ok()?,
        kind: kind?,
        delivery_id: Uuid::parse_str(&r.delivery_id).ok()?,
        url: r.url,
        status: status?,
        attempts: u32::try_from(r.attempts).unwrap_or(0),
        last_status_code: r.last_status_code.and_then(|c| u16::try_from(c).ok()),
        last_error: r.last_error,
        next_attempt_at: r
            .next_attempt_ms
            .filter(|_| status == Some(WebhookDeliveryStatus::Pending))
            .map(time),
        created_at: time(r.created_ms),
        delivered_at: r.delivered_ms.map(time),
    })
}
