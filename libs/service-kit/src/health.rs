//! Liveness and readiness. `/readyz` runs every registered check; one failing makes it `503`.

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use futures::future::BoxFuture;
use sea_orm::DatabaseConnection;
use serde_json::json;

/// Something the service needs to serve traffic (its database, its broker).
pub trait ReadinessCheck: Send + Sync {
    fn name(&self) -> &'static str;
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Ready when the database answers a ping.
pub struct DatabaseCheck(pub DatabaseConnection);

impl ReadinessCheck for DatabaseCheck {
    fn name(&self) -> &'static str {
        "database"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.ping().await.map_err(|e| e.to_string()) })
    }
}

#[derive(Clone, Default)]
pub(crate) struct Readiness(pub Vec<Arc<dyn ReadinessCheck>>);

pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub(crate) async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    for c in &readiness.0 {
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(3), c.check()).await;
        let status = match outcome {
            Ok(Ok(())) => json!({"status": "ok"}),
            Ok(Err(e)) => {
                ready = false;
                tracing::warn!(check = c.name(), error = %e, "readiness check failed");
                json!({"status": "failing", "error": e})
            }
            Err(_) => {
                ready = false;
                json!({"status": "failing", "error": "timed out after 3 s"})
            }
        };
        checks.insert(c.name().to_owned(), status);
    }
    let body = json!({"status": if ready { "ready" } else { "not-ready" }, "checks": checks});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "2"))
            .json(body)
    }
}
