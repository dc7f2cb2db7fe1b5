//! Accounts in the database. Every function takes the connection (and the read cache where it is
//! used) and answers a [`StoreError`]; the routes turn those into HTTP answers.

use contracts::{Account, AccountChanged, AccountStatus, AccountUpsert};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    TransactionTrait,
};

use crate::cache::AccountCache;
use crate::entity;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("account '{0}' does not exist")]
    NotFound(String),
    /// A stored value this code does not expect.
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// What a PUT did.
pub(crate) enum Saved {
    Created(Account),
    /// Already there with another name or status: updated, and the change announced.
    Updated(Account),
    /// Already there as asked: nothing written.
    Unchanged(Account),
}

impl Saved {
    /// Whether the PUT wrote a change (and with it an outbox row for the relay).
    pub(crate) fn changed(&self) -> bool {
        !matches!(self, Saved::Unchanged(_))
    }
}

fn to_wire(m: entity::Model) -> StoreResult<Account> {
    let status = AccountStatus::parse(&m.status).ok_or_else(|| {
        StoreError::Unexpected(format!("account {} has unknown status {}", m.id, m.status))
    })?;
    Ok(Account {
        id: m.id,
        name: m.name,
        status,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

async fn find(db: &impl ConnectionTrait, id: &str) -> StoreResult<entity::Model> {
    entity::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))
}

/// The account as the database has it now.
pub(crate) async fn get(db: &DatabaseConnection, id: &str) -> StoreResult<Account> {
    to_wire(find(db, id).await?)
}

/// The account, from the cache when it was read less than its time to live ago.
pub(crate) async fn get_cached(
    db: &DatabaseConnection,
    cache: &AccountCache,
    id: &str,
) -> StoreResult<Account> {
    if let Some(cached) = cache.get(id) {
        return to_wire(cached);
    }
    let account = find(db, id).await?;
    cache.put(&account);
    to_wire(account)
}

/// Creates the account, or updates its name and status when they differ. A creation or a change
/// raises the account's version and writes its `account.changed` event to the outbox in the same
/// transaction (see `feed`); a PUT that changes nothing writes nothing.
pub(crate) async fn upsert(
    db: &DatabaseConnection,
    cache: &AccountCache,
    id: &str,
    body: &AccountUpsert,
) -> StoreResult<Saved> {
    let now = service_kit::now();
    let status = body.status.as_str();
    cache.forget(id);
    let txn = db.begin().await?;
    // Insert-if-absent decides the one creator among concurrent PUTs of the same id.
    let inserted = entity::Entity::insert(entity::ActiveModel {
        id: Set(id.to_owned()),
        name: Set(body.name.clone()),
        status: Set(status.to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
        version: Set(1),
    })
    .on_conflict(
        OnConflict::column(entity::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(&txn)
    .await?;
    let saved = if inserted == 1 {
        let account = Account {
            id: id.to_owned(),
            name: body.name.clone(),
            status: body.status,
            created_at: now,
            updated_at: now,
        };
        enqueue(&txn, &account, 1, now).await?;
        Saved::Created(account)
    } else {
        // Only when something differs, in the statement that writes: of concurrent PUTs of one
        // body only the first changes the row (PostgreSQL checks the condition again on the row
        // as the writer before it left it), and each change raises the version exactly once.
        use entity::Column;
        let changed = entity::Entity::update_many()
            .col_expr(Column::Name, Expr::value(body.name.clone()))
            .col_expr(Column::Status, Expr::value(status))
            .col_expr(Column::UpdatedAt, Expr::value(now))
            .col_expr(Column::Version, Expr::col(Column::Version).add(1))
            .filter(Column::Id.eq(id))
            .filter(
                Condition::any()
                    .add(Column::Name.ne(body.name.clone()))
                    .add(Column::Status.ne(status)),
            )
            .exec(&txn)
            .await?
            .rows_affected;
        let current = find(&txn, id).await?;
        let version = current.version;
        let account = to_wire(current)?;
        if changed == 1 {
            enqueue(&txn, &account, version, now).await?;
            Saved::Updated(account)
        } else {
            Saved::Unchanged(account)
        }
    };
    txn.commit().await?;
    match &saved {
        Saved::Created(_) => tracing::info!(account_id = id, "account created"),
        Saved::Updated(a) => {
            cache.forget(id);
            tracing::info!(account_id = id, status = %a.status.as_str(), "account updated");
        }
        Saved::Unchanged(_) => {}
    }
    Ok(saved)
}

/// Writes, in the caller's transaction, the `account.changed` event of `account` at `version`.
async fn enqueue(
    txn: &impl ConnectionTrait,
    account: &Account,
    version: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> StoreResult<()> {
    let payload = serde_json::to_string(&AccountChanged {
        account: account.clone(),
        version,
    })
    .map_err(|e| StoreError::Unexpected(format!("encoding an account change: {e}")))?;
    entity::outbox::Entity::insert(entity::outbox::ActiveModel {
        seq: NotSet,
        account_id: Set(account.id.clone()),
        payload: Set(payload),
        created_at: Set(now),
    })
    .exec_without_returning(txn)
    .await?;
    Ok(())
}
