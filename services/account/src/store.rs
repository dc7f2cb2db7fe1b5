//! Accounts in the database. Every function takes the connection (and the read cache where it is
//! used) and answers a [`StoreError`]; the routes turn those into HTTP answers.

use contracts::{Account, AccountStatus, AccountUpsert};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection, DbErr, EntityTrait};

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
    /// Already there: updated if the body differed, otherwise unchanged.
    Existing(Account),
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

async fn find(db: &DatabaseConnection, id: &str) -> StoreResult<entity::Model> {
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

/// Creates the account, or updates its name and status when they differ.
pub(crate) async fn upsert(
    db: &DatabaseConnection,
    cache: &AccountCache,
    id: &str,
    body: &AccountUpsert,
) -> StoreResult<Saved> {
    let now = service_kit::now();
    cache.forget(id);
    // Insert-if-absent decides the one creator among concurrent PUTs of the same id.
    let inserted = entity::Entity::insert(entity::ActiveModel {
        id: Set(id.to_owned()),
        name: Set(body.name.clone()),
        status: Set(body.status.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(entity::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    let current = find(db, id).await?;
    if inserted == 1 {
        tracing::info!(account_id = id, "account created");
        return Ok(Saved::Created(to_wire(current)?));
    }
    if current.name == body.name && current.status == body.status.as_str() {
        return Ok(Saved::Existing(to_wire(current)?));
    }
    let mut active: entity::ActiveModel = current.into();
    active.name = Set(body.name.clone());
    active.status = Set(body.status.as_str().to_owned());
    active.updated_at = Set(now);
    let updated = active.update(db).await?;
    cache.forget(id);
    tracing::info!(account_id = id, status = %updated.status, "account updated");
    Ok(Saved::Existing(to_wire(updated)?))
}
