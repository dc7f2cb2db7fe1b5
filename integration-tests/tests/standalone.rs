//! `make run` in a test: every service in one process on SQLite, driven with the credentials it
//! writes, stopped, and started again on the same data.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use integration_tests::{done_if, eventually, Standalone};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start(dir: &Path) -> Standalone {
    Standalone::start(Standalone::settings(dir)).await
}

fn credentials(dir: &Path) -> BTreeMap<String, String> {
    Standalone::credentials(dir)
}

/// `credentials.env` holds the service token, the JWT key and the dashboard passwords: mode
/// 0600, whatever the umask.
fn assert_only_owner_reads_credentials(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("credentials.env"))
            .expect("credentials.env written")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "credentials.env mode {:o}",
            mode & 0o777
        );
    }
}

async fn send(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_serves_every_service_and_keeps_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let suite = start(dir.path()).await;
    let creds = credentials(dir.path());
    assert_only_owner_reads_credentials(dir.path());
    let token = creds.get("SERVICE_TOKEN").cloned().expect("SERVICE_TOKEN");
    assert_eq!(
        creds.get("CLIENT_ACCOUNT_ID").map(String::as_str),
        Some("demo-account")
    );
    let verifier = service_kit::auth::ClientTokens::new(
        &creds.get("JWT_SECRET").cloned().expect("JWT_SECRET").into(),
    );
    let claims = verifier
        .verify(creds.get("CLIENT_TOKEN").expect("CLIENT_TOKEN"))
        .expect("client token verifies");
    assert_eq!(claims.sub, "demo-account");
    // The dashboard logins.
    assert_eq!(
        creds.get("OPERATOR_USER").map(String::as_str),
        Some("operator")
    );
    assert!(creds
        .get("OPERATOR_PASSWORD")
        .is_some_and(|p| p.len() >= 16));
    assert!(creds.get("VIEWER_PASSWORD").is_some_and(|p| p.len() >= 16));

    let p = &suite.ports;
    for port in [
        p.ingestion,
        p.scheduler,
        p.supervisor,
        p.account,
        p.package,
        p.thirdparty,
        p.drone,
        p.delivery,
    ] {
        for path in ["/healthz", "/readyz", "/openapi.json", "/metrics"] {
            let res = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
                .await
                .expect("get");
            assert_eq!(res.status(), 200, "{path} on {port}");
        }
    }

    let put = reqwest::Method::PUT;
    let package =
        json!({"ownerId": "demo-account", "externalId": "ext-1", "size": "Small", "weight": 1.5});
    let url = format!("http://127.0.0.1:{}/api/packages/pkg-1", p.package);
    let first = send(put.clone(), url.clone(), &token, Some(package.clone())).await;
    let second = send(put.clone(), url, &token, Some(package)).await;
    assert_eq!((first.0.as_u16(), second.0.as_u16()), (201, 200));
    assert_eq!(first.1, second.1);

    let reservation = json!({"pickupTime": "2031-01-01T10:00:00Z", "pickupLocation": "a",
        "dropOffLocation": "b", "packageId": "pkg-1", "size": "Small"});
    let url = format!("http://127.0.0.1:{}/api/dronedeliveries/del-1", p.drone);
    let first = send(put.clone(), url.clone(), &token, Some(reservation.clone())).await;
    let second = send(put.clone(), url, &token, Some(reservation)).await;
    assert_eq!((first.0.as_u16(), second.0.as_u16()), (201, 200));
    assert_eq!(first.1["droneId"], second.1["droneId"]);

    let delivery = json!({"ownerId": "demo-account", "pickupLocation": "a", "dropOffLocation": "b",
        "pickupTime": "2031-01-01T10:00:00Z", "deadline": "LinkedIn", "expedited": false,
        "confirmationRequired": "None", "packageId": "pkg-1", "droneId": first.1["droneId"]});
    let url = format!("http://127.0.0.1:{}/api/deliveries/del-1", p.delivery);
    let a = send(put.clone(), url.clone(), &token, Some(delivery.clone())).await;
    let b = send(put.clone(), url, &token, Some(delivery)).await;
    assert_eq!((a.0.as_u16(), b.0.as_u16()), (201, 204));

    // A booking with the demo client token is accepted (202 after the embedded log confirmed it).
    let client_token = creds.get("CLIENT_TOKEN").cloned().expect("CLIENT_TOKEN");
    let booking = json!({"ownerId": "demo-account", "pickupLocation": "a", "dropOffLocation": "b",
        "pickupTime": "2031-01-01T10:00:00Z", "deadline": "", "expedited": false,
        "confirmationRequired": "None",
        "packageInfo": {"packageId": "p", "size": "Small", "weight": 1}});
    let (status, accepted) = send(
        reqwest::Method::POST,
        format!("http://127.0.0.1:{}/api/deliveryrequests", p.ingestion),
        &client_token,
        Some(booking),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let delivery_id = accepted["deliveryId"]
        .as_str()
        .expect("deliveryId")
        .to_owned();
    suite.stop().await;

    // A second start keeps the data and the service token.
    let suite = start(dir.path()).await;
    let again = credentials(dir.path());
    assert_only_owner_reads_credentials(dir.path());
    assert_eq!(again.get("SERVICE_TOKEN"), Some(&token));
    let (status, body) = send(
        reqwest::Method::GET,
        format!(
            "http://127.0.0.1:{}/api/packages/pkg-1",
            suite.ports.package
        ),
        &token,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["externalId"], "ext-1");
    // The booking is still known after the restart, and its saga (stopped mid-way by the first
    // stop or not) finishes: the read model follows it to `scheduled`.
    let client_token = again.get("CLIENT_TOKEN").cloned().expect("CLIENT_TOKEN");
    let url = format!(
        "http://127.0.0.1:{}/api/deliveryrequests/{delivery_id}",
        suite.ports.ingestion
    );
    let what = "the read model to follow the saga to scheduled";
    eventually(Duration::from_secs(40), what, async || {
        let (status, body) = send(reqwest::Method::GET, url.clone(), &client_token, None).await;
        assert_eq!(status, 200, "{body}");
        done_if(body["state"] == "scheduled", body)
    })
    .await;
    suite.stop().await;
}
