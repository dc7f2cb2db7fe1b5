//! The contracted carriers: checked from the settings, synced into the `carriers` table at start,
//! and read back for every choice (the table, not one replica's settings, is what legs refer to).

use std::collections::BTreeMap;

use contracts::{Carrier, GeoPoint};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
};

use crate::entity::carrier;
use crate::plan::CarrierSpec;
use crate::CarrierSettings;

/// The configured carriers as the choice uses them; an unusable one fails the start, naming it.
pub(crate) fn validate(
    settings: &BTreeMap<String, CarrierSettings>,
) -> anyhow::Result<Vec<CarrierSpec>> {
    settings
        .iter()
        .map(|(id, c)| {
            let bad = |what: &str| anyhow::anyhow!("carrier '{id}': {what}");
            service_kit::valid_id("carrier id", id).map_err(|e| bad(&e.to_string()))?;
            if c.name.trim().is_empty() {
                return Err(bad("name must not be empty"));
            }
            let center = GeoPoint::parse(&c.area_center)
                .ok_or_else(|| bad("area_center must be a point written \"0,<lat>,<lon>\""))?;
            for (what, v) in [
                ("area_radius_km", c.area_radius_km),
                ("max_weight_kg", c.max_weight_kg),
                ("speed_kmh", c.speed_kmh),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(&format!("{what} must be a positive number")));
                }
            }
            if i32::try_from(c.daily_capacity).is_err() {
                return Err(bad("daily_capacity is too large"));
            }
            Ok(CarrierSpec {
                id: id.clone(),
                name: c.name.trim().to_owned(),
                center,
                radius_km: c.area_radius_km,
                daily_capacity: c.daily_capacity,
                max_weight_kg: c.max_weight_kg,
                speed_kmh: c.speed_kmh,
            })
        })
        .collect()
}

/// Upserts the configured carriers (active) and retires every other one. Capacity already taken
/// on a day stays taken: a carrier whose capacity was lowered below it takes no more that day.
pub(crate) async fn sync(db: &impl ConnectionTrait, carriers: &[CarrierSpec]) -> Result<(), DbErr> {
    let now = service_kit::now();
    let rows: Vec<carrier::ActiveModel> = carriers
        .iter()
        .map(|c| carrier::ActiveModel {
            id: Set(c.id.clone()),
            name: Set(c.name.clone()),
            area_center: Set(c.center.location()),
            area_radius_km: Set(c.radius_km),
            daily_capacity: Set(i32::try_from(c.daily_capacity).unwrap_or(i32::MAX)),
            max_weight_kg: Set(c.max_weight_kg),
            speed_kmh: Set(c.speed_kmh),
            active: Set(true),
            updated_at: Set(now),
        })
        .collect();
    if !rows.is_empty() {
        carrier::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::column(carrier::Column::Id)
                    .update_columns([
                        carrier::Column::Name,
                        carrier::Column::AreaCenter,
                        carrier::Column::AreaRadiusKm,
                        carrier::Column::DailyCapacity,
                        carrier::Column::MaxWeightKg,
                        carrier::Column::SpeedKmh,
                        carrier::Column::Active,
                        carrier::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    let ids: Vec<String> = carriers.iter().map(|c| c.id.clone()).collect();
    let retired = carrier::Entity::update_many()
        .col_expr(carrier::Column::Active, Expr::value(false))
        .col_expr(carrier::Column::UpdatedAt, Expr::value(now))
        .filter(carrier::Column::Id.is_not_in(ids))
        .filter(carrier::Column::Active.eq(true))
        .exec(db)
        .await?
        .rows_affected;
    tracing::info!(carriers = carriers.len(), retired, "carriers synced");
    Ok(())
}

/// The active carriers, by id.
pub(crate) async fn active(db: &impl ConnectionTrait) -> Result<Vec<carrier::Model>, DbErr> {
    carrier::Entity::find()
        .filter(carrier::Column::Active.eq(true))
        .order_by_asc(carrier::Column::Id)
        .all(db)
        .await
}

/// A stored carrier as the choice uses it; `None` when its row is unusable (never written so).
pub(crate) fn spec(m: &carrier::Model) -> Option<CarrierSpec> {
    Some(CarrierSpec {
        id: m.id.clone(),
        name: m.name.clone(),
        center: GeoPoint::parse(&m.area_center)?,
        radius_km: m.area_radius_km,
        daily_capacity: u32::try_from(m.daily_capacity).ok()?,
        max_weight_kg: m.max_weight_kg,
        speed_kmh: m.speed_kmh,
    })
}

pub(crate) fn to_wire(m: carrier::Model) -> Carrier {
    Carrier {
        id: m.id,
        name: m.name,
        area_center: m.area_center,
        area_radius_km: m.area_radius_km,
        daily_capacity: u32::try_from(m.daily_capacity).unwrap_or(0),
        max_weight_kg: m.max_weight_kg,
        speed_kmh: m.speed_kmh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_carriers_are_valid_and_cover_the_fabrikam_area() {
        let carriers = validate(&crate::default_carriers()).unwrap_or_default();
        assert_eq!(carriers.len(), 3);
        let seattle = GeoPoint {
            lat: 47.6,
            lon: -122.3,
        };
        assert!(carriers
            .iter()
            .all(|c| c.center.distance_km(seattle) < c.radius_km));
        let capacities: Vec<u32> = carriers.iter().map(|c| c.daily_capacity).collect();
        assert_eq!(capacities, [200, 50, 100], "cascade, olympic, rainier");
    }

    #[test]
    fn an_unusable_carrier_is_named() {
        let mut settings = crate::default_carriers();
        if let Some(c) = settings.get_mut("rainier") {
            c.area_center = "Tacoma".into();
        }
        let err = validate(&settings).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("carrier 'rainier': area_center must be a point written \"0,<lat>,<lon>\"")
        );
        let mut settings = crate::default_carriers();
        if let Some(c) = settings.get_mut("olympic") {
            c.speed_kmh = 0.0;
        }
        let err = validate(&settings).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("carrier 'olympic': speed_kmh must be a positive number")
        );
        let bad_id = BTreeMap::from([(
            "has space".to_owned(),
            crate::default_carriers()
                .remove("cascade")
                .unwrap_or_else(|| panic!("a default carrier")),
        )]);
        assert!(validate(&bad_id).is_err());
    }
}
