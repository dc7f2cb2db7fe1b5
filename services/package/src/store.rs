//! Packages in the database. Every function takes the connection and answers a [`StoreError`];
//! the routes turn those into HTTP answers.

use contracts::{Package, PackagePatch, PackageSize, PackageStatus, PackageSummary, PackageUpsert};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QuerySelect,
};

use crate::entity::{self, Column};

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("package '{0}' does not exist")]
    NotFound(String),
    #[error("package '{0}' was cancelled before it was registered; it cannot be registered now")]
    CancelledBeforeRegistered(String),
    #[error("package '{0}' is cancelled and cannot be changed")]
    Cancelled(String),
    #[error("package '{0}' already exists with different content; use PATCH to change it")]
    DifferentContent(String),
    /// A stored value this code does not expect.
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// What a registration did.
pub(crate) enum Registration {
    Created(Package),
    /// The same package was already there (perhaps cancelled since): returned as it is.
    Replayed(Package),
}

fn to_wire(m: entity::Model) -> StoreResult<Package> {
    let size = PackageSize::parse(&m.size).ok_or_else(|| {
        StoreError::Unexpected(format!("package {} has unknown size {}", m.id, m.size))
    })?;
    let status = PackageStatus::parse(&m.status).ok_or_else(|| {
        StoreError::Unexpected(format!("package {} has unknown status {}", m.id, m.status))
    })?;
    Ok(Package {
        id: m.id,
        owner_id: m.owner_id,
        external_id: m.external_id,
        size,
        weight: m.weight,
        tag: m.tag,
        status,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

/// True when a stored package has exactly the content a PUT asks for (status aside).
fn same_content(m: &entity::Model, body: &PackageUpsert) -> bool {
    m.owner_id == body.owner_id
        && m.external_id == body.external_id
        && m.size == body.size.as_str()
        && m.weight == body.weight
        && m.tag == body.tag
}

async fn find(db: &impl ConnectionTrait, id: &str) -> StoreResult<entity::Model> {
    entity::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .filter(|p| !is_tombstone(p))
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))
}

/// A tombstone: what cancelling a package that does not exist (yet) leaves behind, so that a
/// registration still on its way (a timed-out attempt of a saga that was since compensated)
/// cannot create it afterwards. It has no owner and is never shown: reads of it find nothing.
fn is_tombstone(p: &entity::Model) -> bool {
    p.owner_id.is_empty()
}

pub(crate) async fn get(db: &DatabaseConnection, id: &str) -> StoreResult<Package> {
    to_wire(find(db, id).await?)
}

/// Registers the package, or finds the same one already there; different content for a taken id
/// is refused.
pub(crate) async fn register(
    db: &DatabaseConnection,
    id: &str,
    body: &PackageUpsert,
) -> StoreResult<Registration> {
    let now = service_kit::now();
    // Insert-if-absent decides the one creator among concurrent PUTs of the same id. A new
    // package is one statement (`RETURNING` gives back the row); only a replay reads it.
    let inserted = entity::Entity::insert(entity::ActiveModel {
        id: Set(id.to_owned()),
        owner_id: Set(body.owner_id.clone()),
        external_id: Set(body.external_id.clone()),
        size: Set(body.size.as_str().to_owned()),
        weight: Set(body.weight),
        tag: Set(body.tag.clone()),
        status: Set(PackageStatus::Registered.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned())
    .exec_with_returning(db)
    .await;
    let current = match inserted {
        Ok(created) => {
            tracing::debug!(package_id = id, owner_id = %created.owner_id, "package registered");
            return Ok(Registration::Created(to_wire(created)?));
        }
        // Nothing inserted: the id is taken (PostgreSQL reports no returned row, SQLite no
        // inserted row).
        Err(DbErr::RecordNotFound(_) | DbErr::RecordNotInserted) => {
            match entity::Entity::find_by_id(id.to_owned()).one(db).await? {
                Some(p) if is_tombstone(&p) => {
                    return Err(StoreError::CancelledBeforeRegistered(id.to_owned()))
                }
                Some(p) => p,
                None => return Err(StoreError::NotFound(id.to_owned())),
            }
        }
        Err(e) => return Err(e.into()),
    };
    // A replay returns what is there as is: it neither resurrects a cancelled package nor fails.
    if same_content(&current, body) {
        return Ok(Registration::Replayed(to_wire(current)?));
    }
    Err(StoreError::DifferentContent(id.to_owned()))
}

/// Changes the size, weight or tag of a registered package.
pub(crate) async fn update(
    db: &DatabaseConnection,
    id: &str,
    patch: &PackagePatch,
) -> StoreResult<Package> {
    let mut update = entity::Entity::update_many()
        .col_expr(Column::UpdatedAt, Expr::value(service_kit::now()))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.eq(PackageStatus::Registered.as_str()));
    if let Some(size) = patch.size {
        update = update.col_expr(Column::Size, Expr::value(size.as_str()));
    }
    if let Some(weight) = patch.weight {
        update = update.col_expr(Column::Weight, Expr::value(weight));
    }
    if let Some(tag) = &patch.tag {
        update = update.col_expr(Column::Tag, Expr::value(tag.as_str()));
    }
    // The status condition makes check and write one statement, so a concurrent cancel wins
    // cleanly instead of being followed by an edit.
    let changed = update.exec(db).await?.rows_affected;
    let current = find(db, id).await?;
    if changed == 0 {
        return Err(StoreError::Cancelled(id.to_owned()));
    }
    tracing::info!(package_id = id, "package updated");
    to_wire(current)
}

/// Cancels a package; cancelling a cancelled one returns it unchanged. Cancelling one that does
/// not exist leaves a tombstone and answers [`StoreError::NotFound`].
pub(crate) async fn cancel(db: &DatabaseConnection, id: &str) -> StoreResult<Package> {
    let mut changed = cancel_registered(db, id).await?;
    if changed == 0
        && entity::Entity::find_by_id(id.to_owned())
            .one(db)
            .await?
            .is_none()
    {
        let now = service_kit::now();
        entity::Entity::insert(entity::ActiveModel {
            id: Set(id.to_owned()),
            owner_id: Set(String::new()),
            external_id: Set(String::new()),
            size: Set(PackageSize::Small.as_str().to_owned()),
            weight: Set(0.0),
            tag: Set(None),
            status: Set(PackageStatus::Cancelled.as_str().to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
        tracing::info!(
            package_id = id,
            "cancel of an unknown package: tombstone kept"
        );
        // A package registered between the two statements is cancelled like any other.
        changed = cancel_registered(db, id).await?;
    }
    let current = find(db, id).await?;
    if changed > 0 {
        tracing::info!(package_id = id, "package cancelled");
    }
    to_wire(current)
}

/// Cancels the package if it is registered (one statement, so a concurrent change wins cleanly);
/// how many rows changed.
async fn cancel_registered(db: &impl ConnectionTrait, id: &str) -> Result<u64, DbErr> {
    Ok(entity::Entity::update_many()
        .col_expr(
            Column::Status,
            Expr::value(PackageStatus::Cancelled.as_str()),
        )
        .col_expr(Column::UpdatedAt, Expr::value(service_kit::now()))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.eq(PackageStatus::Registered.as_str()))
        .exec(db)
        .await?
        .rows_affected)
}

/// Counts and weighs one owner's packages, in one grouped query so every number comes from the
/// same snapshot. An owner without packages gets zeros.
pub(crate) async fn summary(
    db: &DatabaseConnection,
    owner_id: &str,
) -> StoreResult<PackageSummary> {
    let groups: Vec<(String, String, i64, Option<f64>)> = entity::Entity::find()
        .select_only()
        .column(Column::Status)
        .column(Column::Size)
        .column_as(Expr::col(Column::Id).count(), "packages")
        .column_as(Expr::col(Column::Weight).sum(), "weight")
        .filter(Column::OwnerId.eq(owner_id))
        .group_by(Column::Status)
        .group_by(Column::Size)
        .into_tuple()
        .all(db)
        .await?;
    let mut out = PackageSummary {
        owner_id: owner_id.to_owned(),
        ..PackageSummary::default()
    };
    for (status, size, count, weight) in groups {
        let count = u64::try_from(count).unwrap_or(0);
        out.total += count;
        match PackageStatus::parse(&status) {
            Some(PackageStatus::Registered) => {
                out.registered += count;
                out.registered_weight += weight.unwrap_or(0.0);
                match PackageSize::parse(&size) {
                    Some(PackageSize::Small) => out.by_size.small += count,
                    Some(PackageSize::Medium) => out.by_size.medium += count,
                    Some(PackageSize::Large) => out.by_size.large += count,
                    None => {
                        return Err(StoreError::Unexpected(format!(
                            "owner {owner_id} has packages of unknown size {size}"
                        )))
                    }
                }
            }
            Some(PackageStatus::Cancelled) => out.cancelled += count,
            None => {
                return Err(StoreError::Unexpected(format!(
                    "owner {owner_id} has packages of unknown status {status}"
                )))
            }
        }
    }
    Ok(out)
}
