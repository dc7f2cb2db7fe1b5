//! Packages in the database. Every function takes the connection and answers a [`StoreError`];
//! the routes turn those into HTTP answers.

use std::collections::{BTreeMap, HashMap, HashSet};

use contracts::{Package, PackagePatch, PackageSize, PackageStatus, PackageSummary, PackageUpsert};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QuerySelect, QueryTrait,
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
#[derive(Debug)]
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

/// The row a registration inserts.
fn new_row(
    id: &str,
    body: &PackageUpsert,
    now: chrono::DateTime<chrono::Utc>,
) -> entity::ActiveModel {
    entity::ActiveModel {
        id: Set(id.to_owned()),
        owner_id: Set(body.owner_id.clone()),
        external_id: Set(body.external_id.clone()),
        size: Set(body.size.as_str().to_owned()),
        weight: Set(body.weight),
        tag: Set(body.tag.clone()),
        status: Set(PackageStatus::Registered.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    }
}

/// What a registration answers when its id is already taken by `current`: a replay returns what
/// is there as is (it neither resurrects a cancelled package nor fails); a tombstone or different
/// content is refused.
fn already_there(
    id: &str,
    current: &entity::Model,
    body: &PackageUpsert,
) -> StoreResult<Registration> {
    if is_tombstone(current) {
        return Err(StoreError::CancelledBeforeRegistered(id.to_owned()));
    }
    if same_content(current, body) {
        return Ok(Registration::Replayed(to_wire(current.clone())?));
    }
    Err(StoreError::DifferentContent(id.to_owned()))
}

/// Registers the package, or finds the same one already there; different content for a taken id
/// is refused.
pub(crate) async fn register(
    db: &DatabaseConnection,
    id: &str,
    body: &PackageUpsert,
) -> StoreResult<Registration> {
    // Insert-if-absent decides the one creator among concurrent PUTs of the same id. A new
    // package is one statement (`RETURNING` gives back the row); only a replay reads it.
    let inserted = entity::Entity::insert(new_row(id, body, service_kit::now()))
        .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned())
        .exec_with_returning(db)
        .await;
    match inserted {
        Ok(created) => {
            tracing::debug!(package_id = id, owner_id = %created.owner_id, "package registered");
            Ok(Registration::Created(to_wire(created)?))
        }
        // Nothing inserted: the id is taken (PostgreSQL reports no returned row, SQLite no
        // inserted row).
        Err(DbErr::RecordNotFound(_) | DbErr::RecordNotInserted) => {
            match entity::Entity::find_by_id(id.to_owned()).one(db).await? {
                Some(current) => already_there(id, &current, body),
                None => Err(StoreError::NotFound(id.to_owned())),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Registers a batch of packages, answering each item as [`register`] would have answered it
/// with the items registered one after another in order: the first occurrence of an id may
/// create it, every later one (and every id already taken) finds what is there.
///
/// At most two statements, whatever the batch size, each its own transaction: one multi-row
/// insert-if-absent with `RETURNING` (the first occurrence of each id), then, only if some id
/// was taken, one read of those ids. Nothing needs the two in one transaction: the insert is
/// atomic on its own, and the read, a later statement, sees a row a concurrent writer committed
/// while the insert waited on it (the insert's snapshot predates that row). The usual batch is
/// then one round trip instead of three (`BEGIN`, insert, `COMMIT`). If the read fails after
/// the insert committed, the batch fails and its retry finds the rows there: each item is
/// answered as a repeated registration is. The outer error fails the whole batch; the inner ones
/// are the items' own refusals.
pub(crate) async fn register_batch(
    db: &DatabaseConnection,
    items: &[(&str, &PackageUpsert)],
) -> StoreResult<Vec<StoreResult<Registration>>> {
    // The first occurrence of each id, in id order: concurrent batches of overlapping ids then
    // take their row locks in one order and cannot deadlock.
    let mut firsts: BTreeMap<&str, &PackageUpsert> = BTreeMap::new();
    for &(id, body) in items {
        firsts.entry(id).or_insert(body);
    }
    if firsts.is_empty() {
        return Ok(Vec::new());
    }
    let now = service_kit::now();
    // Built by hand rather than with `exec_with_returning_many`, which sea-orm refuses (panics)
    // on SQLite without its `RETURNING` feature; SQLite has had `RETURNING` since 3.35. An insert
    // that creates nothing (every id taken) just returns no rows.
    let mut insert =
        entity::Entity::insert_many(firsts.iter().map(|(id, body)| new_row(id, body, now)))
            .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned())
            .into_query();
    insert.returning_all();
    let backend = db.get_database_backend();
    let created: HashMap<String, entity::Model> = entity::Entity::find()
        .from_raw_sql(backend.build(&insert))
        .all(db)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let taken: Vec<&str> = firsts
        .keys()
        .copied()
        .filter(|id| !created.contains_key(*id))
        .collect();
    let existing: HashMap<String, entity::Model> = if taken.is_empty() {
        HashMap::new()
    } else {
        entity::Entity::find()
            .filter(Column::Id.is_in(taken))
            .all(db)
            .await?
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect()
    };
    tracing::debug!(
        items = items.len(),
        created = created.len(),
        found = existing.len(),
        "package batch registered"
    );
    Ok(answer_batch(items, &created, &existing))
}

/// Each item's answer, given the rows the batch created and the rows it found already there.
fn answer_batch(
    items: &[(&str, &PackageUpsert)],
    created: &HashMap<String, entity::Model>,
    existing: &HashMap<String, entity::Model>,
) -> Vec<StoreResult<Registration>> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .map(|&(id, body)| {
            let first = seen.insert(id);
            match (created.get(id), existing.get(id)) {
                (Some(row), _) if first => to_wire(row.clone()).map(Registration::Created),
                // A later occurrence of an id the batch created finds it, as a repeated PUT would.
                (Some(row), _) | (None, Some(row)) => already_there(id, row, body),
                (None, None) => Err(StoreError::NotFound(id.to_owned())),
            }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

    use super::*;

    fn upsert(owner: &str, weight: f64) -> PackageUpsert {
        PackageUpsert {
            owner_id: owner.to_owned(),
            external_id: "ext".to_owned(),
            size: PackageSize::Medium,
            weight,
            tag: None,
        }
    }

    fn row(id: &str, body: &PackageUpsert, status: PackageStatus) -> entity::Model {
        let now = service_kit::now();
        entity::Model {
            id: id.to_owned(),
            owner_id: body.owner_id.clone(),
            external_id: body.external_id.clone(),
            size: body.size.as_str().to_owned(),
            weight: body.weight,
            tag: body.tag.clone(),
            status: status.as_str().to_owned(),
            created_at: now,
            updated_at: now,
        }
    }

    fn by_id(rows: Vec<entity::Model>) -> HashMap<String, entity::Model> {
        rows.into_iter().map(|m| (m.id.clone(), m)).collect()
    }

    /// `created`, `replayed`, or the refusal's code as the routes spell it.
    fn outcome(answer: &StoreResult<Registration>) -> (&'static str, Option<String>) {
        match answer {
            Ok(Registration::Created(p)) => ("created", Some(p.id.clone())),
            Ok(Registration::Replayed(p)) => ("replayed", Some(p.id.clone())),
            Err(StoreError::DifferentContent(id)) => ("conflict", Some(id.clone())),
            Err(StoreError::CancelledBeforeRegistered(id)) => ("cancelled", Some(id.clone())),
            Err(StoreError::NotFound(id)) => ("not-found", Some(id.clone())),
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn each_item_is_answered_as_its_put_in_order_would_be() {
        let mine = upsert("o1", 1.0);
        let other = upsert("o2", 1.0);
        let heavier = upsert("o1", 2.0);
        let tombstone = entity::Model {
            owner_id: String::new(),
            ..row("late", &mine, PackageStatus::Cancelled)
        };
        let created = by_id(vec![row("new", &mine, PackageStatus::Registered)]);
        let existing = by_id(vec![
            row("old", &mine, PackageStatus::Registered),
            row("gone", &mine, PackageStatus::Cancelled),
            tombstone,
        ]);
        let items = [
            ("new", &mine),
            ("old", &mine),
            ("old", &other),
            ("gone", &mine),
            ("late", &mine),
            // Later occurrences of an id the batch created find it.
            ("new", &mine),
            ("new", &heavier),
            // Neither created nor found (removed in between): as the single call.
            ("lost", &mine),
        ];
        let answers = answer_batch(&items, &created, &existing);
        let got: Vec<_> = answers.iter().map(outcome).collect();
        let expected = [
            ("created", "new"),
            ("replayed", "old"),
            ("conflict", "old"),
            ("replayed", "gone"),
            ("cancelled", "late"),
            ("replayed", "new"),
            ("conflict", "new"),
            ("not-found", "lost"),
        ];
        assert_eq!(got, expected.map(|(what, id)| (what, Some(id.to_owned()))),);
        match &answers[3] {
            Ok(Registration::Replayed(p)) => {
                assert_eq!(p.status, PackageStatus::Cancelled, "not resurrected")
            }
            other => panic!("{other:?}"),
        }
    }
}
